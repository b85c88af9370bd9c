"""A run directory belongs to one run: guard, resume config check, append-only metrics,
checkpoint pruning by run, path expansion, errors printed once, the ready record."""

import hashlib
import json
import os

import pytest
import torch

from mpi_util import run_ranks
from zohpc import checkpoint as ckpt
from zohpc.config import load_config
from zohpc.errors import UserError
from zohpc.rundir import plan_start

QUICK = ["--set", "train.epochs=2", "--set", "data.limit=128", "--set", "data.batch_size=64",
         "--set", "prune.method=random", "--set", "train.log_every_seconds=1000"]


def train(k, out, *extra, timeout=240):
    return run_ranks(k, ["-m", "zohpc.train", "--out", str(out), *QUICK, *extra], timeout=timeout)


def tree_hashes(root):
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            out[os.path.relpath(p, root)] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    return out


def lines(run):
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        return [json.loads(x) for x in fh]


def test_second_run_into_used_directory_exits_2_and_changes_nothing(tmp_path):
    run = tmp_path / "run"
    assert train(1, run).returncode == 0
    before = tree_hashes(run)
    p = train(2, run, "--set", "optim.lr=0.2")
    assert p.returncode == 2
    assert str(run) in p.stderr and "--resume auto" in p.stderr and "--out" in p.stderr
    assert p.stderr.count("error:") == 1  # printed once, not once per rank
    assert tree_hashes(run) == before


def test_resume_with_changed_lr_exits_2_naming_it(tmp_path):
    run = tmp_path / "run"
    assert train(1, run, "--set", "train.max_steps=1").returncode == 0
    before = tree_hashes(run)
    p = train(1, run, "--resume", "auto", "--set", "optim.lr=0.2")
    assert p.returncode == 2
    assert "optim.lr" in p.stderr and "0.05" in p.stderr and "0.2" in p.stderr
    assert tree_hashes(run) == before


def test_resume_with_more_epochs_continues_and_appends(tmp_path):
    run = tmp_path / "run"
    assert train(1, run).returncode == 0
    first = lines(run)
    p = train(1, run, "--resume", "auto", "--set", "train.epochs=3")
    assert p.returncode == 0, p.stderr
    after = lines(run)
    assert after[:len(first)] == first  # appended, never truncated
    resume = [r for r in after if r["event"] == "resume"]
    assert len(resume) == 1 and resume[0]["changed"] == ["train.epochs"]
    assert [r["event"] for r in after].count("done") == 2
    assert max(r["epoch"] for r in after if r["event"] == "eval") == 2
    assert "train.epochs changed" in p.stderr


def test_finished_run_resubmitted_says_so_and_exits_0(tmp_path):
    run = tmp_path / "run"
    assert train(1, run).returncode == 0
    before = tree_hashes(run)
    p = train(1, run, "--resume", "auto")
    assert p.returncode == 0
    assert "already complete" in p.stderr
    assert tree_hashes(run) == before


def test_checkpoint_pruning_only_touches_the_runs_own(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run / "checkpoints")
    foreign = run / "checkpoints" / "ckpt-00000001-aaaaaaaaaaaa.h5"
    foreign.write_bytes(b"someone else's")
    os.makedirs(tmp_path / "other")
    p = train(1, run, "--resume", "auto", "--set", "checkpoint.keep=1")  # a directory with no run in it
    assert p.returncode == 0, p.stderr
    assert foreign.exists()
    ours = [x for x in ckpt.list_checkpoints(str(run)) if ckpt.checkpoint_run_id(x) != "aaaaaaaaaaaa"]
    assert len(ours) == 1


def test_prune_checkpoints_needs_and_respects_run_id(tmp_path):
    d = tmp_path / "checkpoints"
    d.mkdir()
    for name in ("ckpt-00000001-111111111111.h5", "ckpt-00000002-111111111111.h5",
                 "ckpt-00000003-222222222222.h5", "ckpt-00000004.h5"):
        (d / name).write_bytes(b"x")
    removed = ckpt.prune_checkpoints(str(tmp_path), 1, "111111111111")
    assert [os.path.basename(r) for r in removed] == ["ckpt-00000001-111111111111.h5"]
    assert sorted(os.listdir(d)) == ["ckpt-00000002-111111111111.h5", "ckpt-00000003-222222222222.h5",
                                     "ckpt-00000004.h5"]


def test_tilde_and_variables_expand_in_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("ZOHPC_TEST_DIR", "sub")
    cfg = load_config(None, ["run.out=~/runs/$ZOHPC_TEST_DIR"])
    assert cfg.run.out == str(tmp_path / "runs" / "sub")
    os.makedirs(tmp_path / "data")
    cfg = load_config(None, ["data.name=hdf5", "data.dir=~/data"])
    assert cfg.data.dir == str(tmp_path / "data")


def test_plan_start_refuses_a_used_directory_without_resume(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    cfg = load_config(None, [], str(run))
    with pytest.raises(UserError, match="already holds a run"):
        plan_start(cfg, None, print)
    fresh = plan_start(load_config(None, [], str(tmp_path / "new")), "auto", print)
    assert fresh.checkpoint is None and len(fresh.run_id) == 12


def test_user_error_under_three_ranks_prints_one_line(tmp_path):
    p = run_ranks(3, ["-m", "zohpc.train", "--out", str(tmp_path / "r"), "--set", "optim.lr=-1"], timeout=120)
    assert p.returncode == 2
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, p.stderr
    assert "optim.lr" in errors[0]


@pytest.mark.parametrize("sets, env, words", [
    (["--set", "train.device=cuda"], {}, "'cuda' requested but no CUDA device"),
    ([], {"ZOHPC_THREADS": "abc"}, "ZOHPC_THREADS: 'abc' is not a positive integer"),
], ids=["cuda_without_gpu", "bad_threads"])
def test_runtime_refusal_is_one_line_on_every_rank_before_the_directory(tmp_path, sets, env, words):
    if sets and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = run_ranks(2, ["-m", "zohpc.train", "--out", str(tmp_path / "r"), *sets], timeout=120, **env)
    errors = [line for line in p.stderr.splitlines() if "error" in line]
    assert p.returncode == 2 and len(errors) == 1 and words in errors[0], p.stderr
    assert "Abort" not in p.stderr and not (tmp_path / "r").exists()


def test_ready_record_has_startup_seconds_and_phases(tmp_path):
    run = tmp_path / "run"
    p = train(2, run, "--set", "train.max_steps=1")
    assert p.returncode == 0, p.stderr
    ready = [r for r in lines(run) if r["event"] == "ready"]
    assert len(ready) == 1
    assert 0 < ready[0]["startup_seconds"] < 120
    assert {"runtime", "task", "masks", "cost model"} <= set(ready[0]["phases"])
    for phase in ("task", "masks", "cost model"):
        assert f"zohpc.train: {phase} done in" in p.stderr
