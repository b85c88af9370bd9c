"""``zohpc.run(task, ...)``: train a task from a Python script, with the same MPI protocol,
checkpoints, resume, metrics and exit codes as ``python -m zohpc.train``::

    # mpirun -n 4 python my_script.py
    import zohpc
    task = zohpc.Task(model=net, train=(x, y), test=(xt, yt), loss=my_black_box)
    result = zohpc.run(task, overrides=["optim.lr=0.01", "train.epochs=5"], out="runs/mine")
"""

from __future__ import annotations

import sys
import time

from .comm import run_guarded
from .config import Config, load_config, validate


def _config(config, overrides, out) -> Config:
    if isinstance(config, Config):
        cfg = load_config(None, [], None)
        cfg.__dict__.update(config.__dict__)
        for text in overrides:
            from .config import apply_mapping, parse_override

            section, key, value = parse_override(text)
            apply_mapping(cfg, {section: {key: value}}, f"override {text}")
        if out:
            cfg.run.out = out
        validate(cfg)
        return cfg
    return load_config(config, list(overrides), out)


def run(task, config=None, *, overrides=(), out: str | None = None, resume: str | None = None,
        save: bool = True) -> dict:
    """Train ``task`` (a :class:`zohpc.tasks.Task`) in place on every rank; return the summary.

    ``config``: a TOML path, a :class:`~zohpc.config.Config` or None (the defaults);
    ``overrides``: ``"section.key=value"`` strings, as ``--set``; ``out``: the run directory
    (a new one, or the run's own with ``resume="auto"``); ``save=False`` writes no files.
    The summary: steps, epochs, seconds, queries, final and best test metrics, history.
    A user error exits 2 and a stop signal 75 on every rank, as the CLI does.
    """
    from .train import train

    t_start = time.time()

    def entry(comm):
        cfg = comm.agree(_config, config, overrides, out)
        return train(comm, cfg, task=task, resume=resume, save=save, prog="zohpc.run", t_start=t_start)

    code, summary = run_guarded(entry, "zohpc.run")
    if code:
        sys.exit(code)
    return summary
