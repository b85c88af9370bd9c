"""The records of ``metrics.jsonl``: one typed dataclass per event, one JSON object per line.

The trainer writes them, checkpoints keep them (the history so far), ``zohpc.analyze``
reads them back with :func:`parse_record`. Keys are only ever added. The file is appended
to, one whole line per write, and never truncated except for a cut last line (a crash in
the middle of a write), which the next append removes so every line stays a record: a resumed run continues it after a ``resume`` record, and where a step
appears twice (a crash after the last checkpoint) the later record is the one that counts.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .fsio import FileSystemError, append_line


@dataclass
class Start:
    """A run began (written once per run)."""
    ranks: int = 1
    model: str = ""
    params: int = 0
    masks: str = ""
    estimator: str = ""
    task: str = "classify"
    time: float = 0.0
    event: str = "start"


@dataclass
class Ready:
    """Start-up is over: the next thing is the first query (written per segment)."""
    startup_seconds: float  # from process start
    phases: dict  # phase name -> seconds
    step: int = 0
    event: str = "ready"


@dataclass
class Masks:
    """A mask draw took effect."""
    epoch: int
    draw: int
    active_coords: int
    time: float = 0.0
    event: str = "masks"


@dataclass
class Step:
    step: int
    epoch: int = 0
    loss: float | None = None
    lr: float | None = None
    queries: int = 0
    seconds: float | None = None
    free_queries: int = 0  # loss values known without a query (embedding rows of absent tokens)
    rank_compute_seconds: list = field(default_factory=list)
    time: float = 0.0
    event: str = "step"


@dataclass
class Eval:
    step: int
    epoch: int
    test_loss: float | None = None
    metrics: dict = field(default_factory=dict)
    test_acc: float | None = None  # the classify task's headline figure (metrics["accuracy"])
    time: float = 0.0
    event: str = "eval"

    def __post_init__(self):
        if self.test_acc is None:
            self.test_acc = self.metrics.get("accuracy")


@dataclass
class Resume:
    """A new segment continues the run from a checkpoint."""
    step: int
    checkpoint: str
    changed: list = field(default_factory=list)  # config keys changed on resume (allowed ones)
    ranks: int = 1
    event: str = "resume"


@dataclass
class Stopped:
    """A stop signal ended the segment; ``checkpoint`` holds the last completed step."""
    step: int
    signal: str
    checkpoint: str | None
    time: float = 0.0
    event: str = "stopped"


@dataclass
class Done:
    step: int
    epoch: int
    best: dict = field(default_factory=dict)
    final: dict = field(default_factory=dict)
    queries: int = 0
    wall_seconds: float | None = None
    best_test_acc: float | None = None
    final_test_acc: float | None = None
    event: str = "done"

    def __post_init__(self):
        if self.best_test_acc is None:
            self.best_test_acc = self.best.get("accuracy")
        if self.final_test_acc is None:
            self.final_test_acc = self.final.get("accuracy")


RECORDS = {cls.__dataclass_fields__["event"].default: cls
           for cls in (Start, Ready, Masks, Step, Eval, Resume, Stopped, Done)}


def to_json(record) -> dict:
    return dataclasses.asdict(record)


def parse_record(obj: dict):
    """The typed record of a JSON object, or None (unknown event, missing or mistyped keys)."""
    cls = RECORDS.get(obj.get("event")) if isinstance(obj, dict) else None
    if cls is None:
        return None
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in obj.items() if k in names})
    except TypeError:
        return None


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """``metrics.jsonl`` of a run on the driver (append-only) and the history kept in checkpoints.

    ``sinks``: further backends (zohpc.sinks, e.g. TensorBoard) that receive every typed
    record written; ``metrics.jsonl`` stays the file ``analyze`` reads.
    """

    def __init__(self, path: str | None, history: list[dict] | None = None, sinks: list | None = None):
        self.path = path
        self.history = list(history or [])
        self.sinks = list(sinks or [])
        self.error = None  # the first failed append (a full disk): raised at the next agreed point

    def write(self, record) -> dict:
        """Keep ``record`` and append it as one line (one write; a cut last line left by a
        crash is removed first). A failed append stops the file's writes and is kept for
        :meth:`raise_error`, so the driver alone never leaves the other ranks waiting."""
        obj = to_json(record)
        self.history.append(obj)
        if self.path is not None and self.error is None:
            line = json.dumps({k: _finite(v) for k, v in obj.items()}) + "\n"
            try:
                append_line(self.path, line)
            except FileSystemError as exc:
                self.error = exc
        for sink in self.sinks:
            sink.write(record)
        return obj

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()

    def records(self, cls):
        return [r for r in map(parse_record, self.history) if isinstance(r, cls)]
