"""Exact resume and preemption: interrupted runs end bit-identical to uninterrupted ones."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mpi_util import ROOT, env, run_ranks
from zohpc import checkpoint as ckpt

COMMON = ["--set", "train.epochs=2", "--set", "data.limit=256", "--set", "data.batch_size=64",
          "--set", "prune.queries=16", "--set", "prune.mask_interval=1", "--set", "train.log_every_seconds=1000",
          "--set", "optim.warmup_epochs=1"]
STEPS_PER_EPOCH = 4
VOLATILE = {"time", "seconds", "rank_compute_seconds", "wall_seconds"}


def train(k, run_dir, *extra, timeout=240):
    return run_ranks(k, ["-m", "zohpc.train", "--out", str(run_dir), *COMMON, *extra], timeout=timeout)


def stable_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE} for line in fh]


def final_state(run_dir):
    path = ckpt.list_checkpoints(str(run_dir))[0]
    return ckpt.load_checkpoint(path)


def assert_same_run(a, b):
    sa, sb = final_state(a), final_state(b)
    assert sa.step == sb.step == 2 * STEPS_PER_EPOCH
    for n in sa.params:
        assert torch.equal(sa.params[n], sb.params[n]), n
    for n in sa.buffers:
        assert torch.equal(sa.buffers[n], sb.buffers[n]), n
    assert stable_metrics(a) == stable_metrics(b)


@pytest.mark.parametrize("k", [1, 2])
def test_resume_after_one_epoch_is_exact(tmp_path, k):
    full, split = tmp_path / "full", tmp_path / "split"
    p = train(k, full)
    assert p.returncode == 0, p.stderr
    p = train(k, split, "--set", f"train.max_steps={STEPS_PER_EPOCH}")
    assert p.returncode == 0, p.stderr
    assert final_state(split).step == STEPS_PER_EPOCH
    p = train(k, split, "--resume", "auto")
    assert p.returncode == 0, p.stderr
    assert_same_run(full, split)


def test_sigterm_checkpoints_and_resume_matches(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = train(1, full)
    assert p.returncode == 0, p.stderr
    cmd = [sys.executable, "-m", "zohpc.train", "--out", str(cut), *COMMON]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = cut / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"event": "step"') >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    saved = ckpt.list_checkpoints(str(cut))
    assert saved, "no checkpoint after SIGTERM"
    state = ckpt.load_checkpoint(saved[0])  # verifies
    assert 2 <= state.step < 2 * STEPS_PER_EPOCH
    p = train(1, cut, "--resume", "auto")
    assert p.returncode == 0, p.stderr
    assert_same_run(full, cut)


def test_resume_skips_corrupted_newest(tmp_path):
    run = tmp_path / "run"
    p = train(1, run, "--set", "checkpoint.keep=5")
    assert p.returncode == 0, p.stderr
    paths = ckpt.list_checkpoints(str(run))
    assert len(paths) >= 2
    newest = paths[0]
    data = bytearray(open(newest, "rb").read())
    open(newest, "wb").write(bytes(data[: len(data) // 2]))  # truncated
    p = train(1, run, "--resume", "auto")
    assert p.returncode == 0, p.stderr
    assert os.path.basename(newest) in p.stderr and "warning" in p.stderr


def test_resume_explicit_bad_path_exits_2(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not hdf5 at all")
    p = train(1, tmp_path / "run", "--resume", str(bogus))
    assert p.returncode == 2
    assert str(bogus) in p.stderr


def test_resume_with_another_model_exits_2(tmp_path):
    run = tmp_path / "run"
    p = train(1, run, "--set", "train.max_steps=2")
    assert p.returncode == 0, p.stderr
    p = train(1, run, "--resume", "auto", "--set", "model.name=cnn_d1")
    assert p.returncode == 2
    assert "another model" in p.stderr or "shape" in p.stderr
