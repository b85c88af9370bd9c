"""A run directory belongs to one run: the guard that keeps a second run out of it, its
identity (``run.json``), and the decision of what a start means (fresh, resume, or nothing
left to do). Every check here runs before any heavy work, and changes nothing on failure.

Layout: ``run.json`` (run id, created), ``config.toml`` (the resolved config of the latest
segment), ``metrics.jsonl`` (append-only), ``logs/rank-R.log``, ``checkpoints/`` (files
named ``ckpt-<step>-<run id>.h5``; only the run's own are ever pruned).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import dataclass

from . import checkpoint as ckpt
from .config import Config, flat, from_toml_text, to_toml, trajectory_changes
from .errors import UserError
from .h5util import fsync_dir

RUN_FILE = "run.json"
RUN_MARKERS = ("run.json", "metrics.jsonl", "config.toml")


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path) or ".")


def holds_run(path: str) -> list[str]:
    """What in ``path`` shows that a run used it (empty if nothing does)."""
    found = [name for name in RUN_MARKERS if os.path.exists(os.path.join(path, name))]
    if ckpt.list_checkpoints(path):
        found.append("checkpoints/")
    return found


def read_run_id(path: str) -> str | None:
    try:
        with open(os.path.join(path, RUN_FILE)) as fh:
            value = json.load(fh).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and len(value) == 12 else None


@dataclass
class Plan:
    """What this start does: a fresh run, or a resume (``checkpoint`` set), in ``run_id``."""

    run_id: str
    checkpoint: tuple | None  # (path, Checkpoint) or None
    changed: list  # allowed config changes since the stored config
    restart: bool = False  # the run exists but has no checkpoint yet: start it again from step 0


def _config_check(stored_text: str, cfg: Config, source: str) -> list[str]:
    stored = from_toml_text(stored_text, source, check_paths=False)
    bad, allowed = trajectory_changes(stored, cfg)
    if bad:
        before, after = flat(stored), flat(cfg)
        shown = ", ".join(f"{k} ({before.get(k, '<unset>')!r} -> {after.get(k, '<unset>')!r})" for k in bad[:6])
        raise UserError(f"resume: the config differs from the run's in keys that change its trajectory: "
                        f"{shown}; undo them, or start a new run with another --out")
    return allowed


def plan_start(cfg: Config, resume: str | None, warn) -> Plan:
    """Decide what this start does, or raise UserError (one line) without touching anything."""
    out = cfg.run.out
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"run directory {out} exists and is not a directory")
    used = holds_run(out) if os.path.isdir(out) else []
    if not resume:
        if used:
            raise UserError(f"run directory {out} already holds a run ({', '.join(used)}); continue it with "
                            f"--resume auto, or pass another --out")
        return Plan(run_id=secrets.token_hex(6), checkpoint=None, changed=[])
    found = ckpt.resolve_resume(resume, out, warn)
    if resume != "auto" and found is None:
        raise UserError(f"--resume {resume}: no checkpoint to resume from")
    own_id = read_run_id(out)
    if found is not None:
        path, state = found
        inside = os.path.realpath(os.path.dirname(os.path.dirname(path))) == os.path.realpath(out)
        if not inside and used:
            raise UserError(f"--resume {path}: run directory {out} already holds another run; "
                            f"resume into a new --out")
        changed = _config_check(state.config_toml, cfg, f"the config stored in {path}")
        run_id = (own_id or ckpt.checkpoint_run_id(path) or secrets.token_hex(6)) if inside else secrets.token_hex(6)
        return Plan(run_id=run_id, checkpoint=found, changed=changed)
    if not used:  # --resume auto on a new directory: a fresh run (what job templates rely on)
        return Plan(run_id=secrets.token_hex(6), checkpoint=None, changed=[])
    stored = os.path.join(out, "config.toml")
    if os.path.isfile(stored):
        with open(stored) as fh:
            changed = _config_check(fh.read(), cfg, stored)
    else:
        changed = []
    return Plan(run_id=own_id or secrets.token_hex(6), checkpoint=None, changed=changed, restart=True)


def prepare_directory(cfg: Config, plan: Plan) -> None:
    """Create the directory structure; write ``run.json`` for a new run and the current config
    (driver only; after every rank has agreed on the plan)."""
    out = cfg.run.out
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    os.makedirs(ckpt.checkpoint_dir(out), exist_ok=True)
    if read_run_id(out) != plan.run_id:
        _write_atomic(os.path.join(out, RUN_FILE), json.dumps({"run_id": plan.run_id, "created": time.time()}) + "\n")
    _write_atomic(os.path.join(out, "config.toml"), to_toml(cfg))
