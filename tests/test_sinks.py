"""Metrics sinks: TensorBoard event files carry the same values as metrics.jsonl."""

import json
import os

import pytest

from mpi_util import run_ranks

pytest.importorskip("tensorboard")

QUICK = ["--set", "train.epochs=2", "--set", "data.limit=128", "--set", "data.batch_size=64",
         "--set", "prune.method=random", "--set", "train.log_every_seconds=1000"]


def test_tensorboard_events_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    p = run_ranks(1, ["-m", "zohpc.train", "--out", str(run), *QUICK, "--set", "logging.tensorboard=true"],
                  timeout=240)
    assert p.returncode == 0, p.stderr
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        recs = [json.loads(x) for x in fh]
    steps = [r for r in recs if r["event"] == "step"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert steps and evals
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    assert loss == pytest.approx({r["step"]: r["loss"] for r in steps}, rel=1e-6)  # (float32 in the events)
    test_acc = {e.step: e.value for e in acc.Scalars("test/accuracy")}
    assert test_acc == pytest.approx({r["step"]: r["test_acc"] for r in evals}, rel=1e-6)
    test_loss = {e.step: e.value for e in acc.Scalars("test/loss")}
    assert test_loss == pytest.approx({r["step"]: r["test_loss"] for r in evals}, rel=1e-6)


def test_tensorboard_key_is_validated():
    from zohpc.config import load_config
    from zohpc.errors import ConfigError

    assert load_config(None, ["logging.tensorboard=true"]).logging.tensorboard is True
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        load_config(None, ["logging.tensorboard=3"])
