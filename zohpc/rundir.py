"""A run directory belongs to one run: the claim that keeps a second process out of it, its
identity (``run.json``), and the decision of what a start means (fresh, resume, or nothing
left to do). Every check here runs before any heavy work, and a refused start changes
nothing in a directory that holds a run.

The claim (:func:`claim_directory`) is an exclusive ``flock`` on the file ``lock``, taken
by the driver before anything is read or written and held until the process ends. Two
starts into one directory at the same moment (two new runs, two ``--resume auto``) cannot
both hold it: the second exits 2 in one line. The kernel drops the lock with the process,
so a claim never outlives a ``kill -9`` and needs no clean-up.

Layout: ``lock`` (the claim; empty), ``run.json`` (run id, created),
``config.toml`` (the resolved config of the latest segment), ``metrics.jsonl``
(append-only), ``logs/rank-R.log``, ``checkpoints/`` (files named
``ckpt-<step>-<run id>.h5``; only the run's own are ever pruned).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import secrets
import time
from dataclasses import dataclass

from . import checkpoint as ckpt
from .config import Config, flat, from_toml_text, to_toml, trajectory_changes
from .errors import UserError
from .fsio import FileSystemError, make_dirs, write_atomic

RUN_FILE = "run.json"
LOCK_FILE = "lock"
RUN_MARKERS = ("run.json", "metrics.jsonl", "config.toml")


class Claim:
    """This process's exclusive hold on a run directory (see the module docstring)."""

    def __init__(self, out: str, fd: int, created: bool, created_lock: bool):
        self.out, self.fd, self.created, self.created_lock = out, fd, created, created_lock

    def release(self, discard: bool = False) -> None:
        """Drop the lock. ``discard``: the start was refused before writing anything, so the
        lock file and the directory this claim created are removed again."""
        if self.fd is None:
            return
        if discard and self.created_lock:
            try:
                os.remove(os.path.join(self.out, LOCK_FILE))
                if self.created:
                    os.rmdir(self.out)
            except OSError:
                pass
        os.close(self.fd)
        self.fd = None


def claim_directory(out: str) -> Claim:
    """Create ``out`` if needed and take its exclusive claim (a read-only mount, a path
    through a regular file: one FileSystemError line; another live holder: one UserError
    line). The lock file stays empty: a refused or finished start changes no byte."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise UserError(f"run directory {out} exists and is not a directory")
    created = not os.path.isdir(out)
    make_dirs(out, "create run directory")
    lock = os.path.join(out, LOCK_FILE)
    created_lock = not os.path.lexists(lock)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if created:
            try:
                os.rmdir(out)
            except OSError:
                pass
        raise FileSystemError("claim run directory", out, exc) from None
    claim = Claim(out, fd, created, created_lock)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise UserError(f"run directory {out} is in use by another run (a live process holds the lock on "
                            f"{lock}); wait for it to end, or pass another --out") from None
        raise FileSystemError("claim run directory", out, exc) from None
    return claim


def holds_run(path: str) -> list[str]:
    """What in ``path`` shows that a run used it (empty if nothing does)."""
    found = [name for name in RUN_MARKERS if os.path.exists(os.path.join(path, name))]
    if ckpt.list_checkpoints(path):
        found.append("checkpoints/")
    return found


def stepped(path: str) -> bool:
    """Whether the run in ``path`` ever completed a step (a checkpoint, or a step record). A
    run that failed before its first step (a refused mask file, a bad data path) is not
    one yet: a new start, or ``--resume auto``, takes its directory (one with zohpc's own
    ``run.json``) over."""
    if ckpt.list_checkpoints(path):
        return True
    try:
        with open(os.path.join(path, "metrics.jsonl"), "rb") as fh:
            return any(b'"event": "step"' in line for line in fh)
    except OSError:
        return False


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
    takeover: bool = False  # the directory holds a run that never completed a step: start afresh in it


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
    if used and resume in (None, "", "auto") and read_run_id(out) and not stepped(out):
        return Plan(run_id=secrets.token_hex(6), checkpoint=None, changed=[], takeover=True)
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
    (driver only; after every rank has agreed on the plan). Taking over a run that never
    stepped starts its ``metrics.jsonl`` again."""
    out = cfg.run.out
    make_dirs(os.path.join(out, "logs"))
    make_dirs(ckpt.checkpoint_dir(out))
    if plan.takeover:
        try:
            os.remove(os.path.join(out, "metrics.jsonl"))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise FileSystemError("remove", os.path.join(out, "metrics.jsonl"), exc) from None
    if read_run_id(out) != plan.run_id:
        write_atomic(os.path.join(out, RUN_FILE), json.dumps({"run_id": plan.run_id, "created": time.time()}) + "\n")
    write_atomic(os.path.join(out, "config.toml"), to_toml(cfg))
