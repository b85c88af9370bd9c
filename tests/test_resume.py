"""Exact resume and preemption: interrupted runs end bit-identical to uninterrupted ones;
stop signals are answered within 30 s in every phase of a run."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from mpi_util import ROOT, env, mpiexec, run_ranks
from zohpc import checkpoint as ckpt

COMMON = ["--set", "train.epochs=2", "--set", "data.limit=256", "--set", "data.batch_size=64",
          "--set", "prune.queries=16", "--set", "prune.mask_interval=1", "--set", "train.log_every_seconds=1000",
          "--set", "optim.warmup_epochs=1"]
STEPS_PER_EPOCH = 4
VOLATILE = {"time", "seconds", "rank_compute_seconds", "wall_seconds"}


def train(k, run_dir, *extra, timeout=240, **env_extra):
    return run_ranks(k, ["-m", "zohpc.train", "--out", str(run_dir), *COMMON, *extra], timeout=timeout, **env_extra)


def records(run_dir, *events):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        recs = [json.loads(line) for line in fh]
    return [r for r in recs if not events or r.get("event") in events]


def trajectory(run_dir):
    """Step and eval records, the last one of each step (a resumed segment may repeat steps)."""
    out = {}
    for r in records(run_dir, "step", "eval"):
        out[(r["event"], r["step"])] = {k: v for k, v in r.items() if k not in VOLATILE}
    return [out[k] for k in sorted(out, key=lambda k: (k[1], k[0]))]


def final_state(run_dir):
    return ckpt.load_checkpoint(ckpt.list_checkpoints(str(run_dir))[0])


def assert_same_run(a, b, steps=2 * STEPS_PER_EPOCH):
    sa, sb = final_state(a), final_state(b)
    assert sa.step == sb.step == steps
    for n in sa.params:
        assert torch.equal(sa.params[n], sb.params[n]), n
    for n in sa.buffers:
        assert torch.equal(sa.buffers[n], sb.buffers[n]), n
    assert trajectory(a) == trajectory(b)


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
    assert "masks" not in re.findall(r"zohpc.train: (masks)", p.stderr)  # resume never prunes
    assert_same_run(full, split)
    assert [r["event"] for r in records(split, "start", "resume")] == ["start", "resume"]


# Where a stop lands: (ZOHPC_TEST_SIGNAL spec, run options). The hook sends SIGTERM to the
# process(es) at the N-th stop check of the phase; ":0" = on rank 0 only (the other rank
# learns of it by the stop notice).
PHASES = {
    "pruning": ("masks:3", ["--set", "prune.method=zo_grasp", "--set", "prune.queries=256"]),
    "cost model": ("cost model:1", []),
    "mid-step": ("step:15", []),
    "mid-step rank 0 only": ("step:15:0", []),
    "rge mid-step": ("step:3:0", ["--set", "zo.estimator=rge", "--set", "optim.lr=0.01", "--set",
                                  "prune.method=none"]),
    "lizo mid-step": ("step:13", ["--set", "optim.name=lizo", "--set", "optim.lr=0.5", "--set",
                                  "prune.method=none"]),
}


@pytest.mark.parametrize("where", list(PHASES))
def test_stop_anywhere_exits_75_within_30s_and_resume_is_exact(tmp_path, where):
    spec, extra = PHASES[where]
    full, cut = tmp_path / "full", tmp_path / "cut"
    p = train(2, full, *extra)
    assert p.returncode == 0, p.stderr
    t0 = time.time()
    p = train(2, cut, *extra, ZOHPC_TEST_SIGNAL=spec)
    assert p.returncode == 75, p.stdout + p.stderr
    sent = [float(m) for m in re.findall(r"test hook: SIGTERM to rank \d+ in .* at ([0-9.]+)", p.stderr)]
    assert sent, p.stderr
    assert time.time() - min(sent) < 30 and time.time() - t0 < 200
    assert "stop (SIGTERM" in p.stderr or "stop (notice" in p.stderr
    stopped = records(cut, "stopped")
    assert len(stopped) == 1
    p = train(2, cut, *extra, "--resume", "auto")
    assert p.returncode == 0, p.stderr
    assert_same_run(full, cut)


def test_sigterm_to_mpiexec_is_forwarded(tmp_path):
    """A signal to the launcher only (timeout, Ctrl-C): MPICH's mpiexec forwards it to every rank."""
    cut = tmp_path / "cut"
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "zohpc.train", "--out", str(cut), *COMMON,
           "--set", "train.epochs=50"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    metrics = cut / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"event": "step"') >= 2:
            break
        time.sleep(0.05)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err
    assert time.time() - t0 < 30
    state = ckpt.load_checkpoint(ckpt.list_checkpoints(str(cut))[0])
    assert state.step >= 2


def test_resume_skips_corrupted_newest(tmp_path):
    run = tmp_path / "run"
    p = train(1, run, "--set", "checkpoint.keep=5")
    assert p.returncode == 0, p.stderr
    paths = ckpt.list_checkpoints(str(run))
    assert len(paths) >= 2
    newest = paths[0]
    data = bytearray(open(newest, "rb").read())
    open(newest, "wb").write(bytes(data[: len(data) // 2]))  # truncated
    p = train(1, run, "--resume", "auto", "--set", "train.epochs=3")
    assert p.returncode == 0, p.stderr
    assert os.path.basename(newest) in p.stderr and "warning" in p.stderr


def test_resume_explicit_bad_path_exits_2(tmp_path):
    bogus = tmp_path / "bogus.h5"
    bogus.write_bytes(b"not hdf5 at all")
    p = train(1, tmp_path / "run", "--resume", str(bogus))
    assert p.returncode == 2
    assert str(bogus) in p.stderr
    assert not (tmp_path / "run").exists()


def test_resume_with_another_model_exits_2_before_any_work(tmp_path):
    run = tmp_path / "run"
    p = train(1, run, "--set", "train.max_steps=2")
    assert p.returncode == 0, p.stderr
    t0 = time.time()
    p = train(1, run, "--resume", "auto", "--set", "model.name=cnn_d1")
    assert p.returncode == 2
    assert "model.name" in p.stderr and "trajectory" in p.stderr
    assert time.time() - t0 < 60
