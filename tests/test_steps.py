"""The step protocol over MPI: sharding, gradients across K ranks, loss curves, BatchNorm
statistics, aborts and user errors."""

import json
import os
import time

import numpy as np
import pytest
import torch

from mpi_util import ROOT, gradient_problem, run_ranks
from zohpc.sharding import balanced_bounds, contiguous_split, shard_costs
from zohpc.zo import cge

SCRIPT = os.path.join(ROOT, "tests", "scripts", "mpi_gradient.py")


def test_balanced_bounds_cover_and_balance():
    counts, costs = [10, 1000, 5, 300], [1.0, 0.01, 4.0, 0.5]
    for parts in (1, 2, 3, 7):
        b = balanced_bounds(counts, costs, parts)
        assert b[0] == 0 and b[-1] == sum(counts) and len(b) == parts + 1
        assert all(b[i] <= b[i + 1] for i in range(parts))
        loads = shard_costs(b, counts, costs)
        assert abs(sum(loads) - sum(n * c for n, c in zip(counts, costs))) < 1e-9
        assert max(loads) <= sum(loads) / parts + max(costs) + 1e-9  # within one coordinate of even
        g = balanced_bounds(counts, costs, parts, granule=8)
        starts = [0, 10, 1010, 1015]
        for bound in g[1:-1]:  # on a multiple of the granule from its parameter's start, or an end
            p = max(i for i, s0 in enumerate(starts) if s0 <= bound)
            assert (bound - starts[p]) % 8 == 0 or bound == starts[p] + counts[p]


def single_process_gradient(model_name):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (ZOHPC_THREADS=1): the same kernels
    try:
        return _single_process_gradient(model_name)
    finally:
        torch.set_num_threads(threads)


def _single_process_gradient(model_name):
    model, x, y, coords, engine = gradient_problem(model_name)
    base = engine.prepare(x, y)
    values = cge(engine, coords, 5e-3, "forward", base=base)
    active = torch.cat([g.reshape(-1) for g in coords.scatter(torch.ones(coords.total))]).numpy() > 0
    return torch.cat([g.reshape(-1) for g in coords.scatter(values)]).numpy(), active


@pytest.mark.parametrize("model_name", ["digits_cnn", "resnet20"])
def test_gradient_same_on_1_2_3_ranks(tmp_path, model_name):
    ref, active = single_process_gradient(model_name)
    for k, features in [(1, "recompute"), (2, "recompute"), (2, "broadcast"), (3, "broadcast")]:
        if model_name == "resnet20" and k == 3:
            continue  # keeps the suite short; digits covers 3 ranks
        out = tmp_path / f"g{k}{features}.npy"
        proc = run_ranks(k, [SCRIPT, model_name, features, str(out)])
        assert proc.returncode == 0, proc.stderr
        got = np.load(out, allow_pickle=False)
        assert (got[~active] == 0).all(), f"inactive coordinates got values with {k} ranks ({features})"
        if k > 1:  # same stacked groups whatever the layout: bit-identical across rank counts
            np.testing.assert_array_equal(got, prev)
        prev = got
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=2e-4 * np.abs(ref).max())


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def short_run(k, run_dir, *extra, timeout=240):
    args = ["-m", "zohpc.train", "--out", str(run_dir), "--set", "train.epochs=2", "--set", "data.limit=256",
            "--set", "data.batch_size=64", "--set", "prune.queries=16", "--set", "train.log_every_seconds=1000",
            *extra]
    return run_ranks(k, args, timeout=timeout)


def test_two_ranks_reproduce_one_rank_loss_curve(tmp_path):
    p1 = short_run(1, tmp_path / "r1")
    assert p1.returncode == 0, p1.stderr
    p2 = short_run(2, tmp_path / "r2")
    assert p2.returncode == 0, p2.stderr
    m1, m2 = read_metrics(tmp_path / "r1"), read_metrics(tmp_path / "r2")
    l1 = [r["loss"] for r in m1 if r["event"] == "step"]
    l2 = [r["loss"] for r in m2 if r["event"] == "step"]
    assert len(l1) == len(l2) == 8
    np.testing.assert_allclose(l2, l1, rtol=1e-4)
    assert m2[0]["ranks"] == 2 and m2[-1]["event"] == "done"
    assert [r["event"] for r in m2][:2] == ["start", "masks"] or "ready" in [r["event"] for r in m2]
    assert [r["event"] for r in m1].count("eval") == 2
    steps = [r for r in m2 if r["event"] == "step"]
    assert all(len(r["rank_compute_seconds"]) == 2 for r in steps)
    assert os.path.exists(tmp_path / "r2" / "logs" / "rank-1.log")


def test_exception_on_worker_aborts_job_quickly(tmp_path):
    t0 = time.time()
    proc = run_ranks(
        2, ["-m", "zohpc.train", "--out", str(tmp_path / "crash"), "--set", "data.limit=256",
            "--set", "prune.method=none"], timeout=60, ZOHPC_TEST_FAIL_AT="1:1")
    assert proc.returncode != 0
    assert time.time() - t0 < 30
    out = proc.stdout + proc.stderr
    assert "rank 1/2" in out and "injected failure" in out


@pytest.mark.parametrize("args, word", [  # printed once, exit 2 on every rank
    (["--set", "optim.lrr=1"], "optim.lrr"),
    (["--set", "data.name=mnist", "--set", "data.dir=/nonexistent/mnist"], "/nonexistent/mnist"),
])
def test_user_error_exits_2_on_all_ranks(tmp_path, args, word):
    proc = run_ranks(2, ["-m", "zohpc.train", "--out", str(tmp_path / "bad"), *args], timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and word in lines[0] and lines[0].startswith("zohpc.train: error:"), proc.stderr


def test_corrected_costs_move_work_to_the_fast_rank():
    from zohpc.sharding import corrected_costs

    counts, costs = [100, 100, 100, 100], [1.0, 1.0, 1.0, 1.0]
    bounds = balanced_bounds(counts, costs, 2)
    assert bounds == [0, 200, 400]
    # the second shard really took twice as long as predicted: its parameters cost more
    new = corrected_costs(bounds, counts, costs, [200.0, 400.0])
    assert new[:2] == [1.0, 1.0] and new[2:] == [2.0, 2.0]
    better = balanced_bounds(counts, new, 2)
    loads = shard_costs(better, counts, new)
    assert better[1] > 200 and max(loads) / (sum(loads) / 2) < 1.01


def test_gradient_independent_of_shard_layout_and_history():
    """Any layout whose bounds fall on query groups gives bit-identical values, also when
    max_elements caps the stacked group below query_batch, on a fresh engine per shard."""
    from zohpc.zo import QueryEngine

    model, x, y, coords, _ = gradient_problem("resnet20")
    whole_engine = QueryEngine(model, query_batch=8, max_elements=3000)
    base = whole_engine.prepare(x, y)
    whole = cge(whole_engine, coords, 5e-3, "forward", base=base)
    assert any(whole_engine.batch_size(pi) < 8 for pi in range(len(coords.counts)) if coords.counts[pi])
    for parts, costs in [(2, None), (3, [1.0 + (i % 5) for i in range(len(coords.counts))])]:
        bounds = balanced_bounds(list(coords.counts), costs or [1.0] * len(coords.counts), parts, granule=8)
        pieces = []
        for r in range(parts):
            engine = QueryEngine(model, query_batch=8, max_elements=3000)  # no shared history
            engine.prepare(x, y)
            pieces.append(cge(engine, coords, 5e-3, "forward", bounds[r], bounds[r + 1], base=base))
        assert torch.equal(torch.cat(pieces), whole)


@pytest.mark.parametrize("variant", [
    ["--set", "zo.estimator=rge", "--set", "zo.rge_queries=16", "--set", "optim.lr=0.01", "--set", "prune.method=none"],
    ["--set", "optim.name=lizo", "--set", "optim.lr=0.5", "--set", "optim.max_reuse_rate=0", "--set",
     "prune.method=none"],
], ids=["rge", "lizo"])
def test_rge_and_lizo_training_same_on_1_and_2_ranks(tmp_path, variant):
    runs = []
    for k in (1, 2):
        p = short_run(k, tmp_path / f"r{k}", *variant)
        assert p.returncode == 0, p.stderr
        runs.append([r for r in read_metrics(tmp_path / f"r{k}") if r["event"] == "step"])
    l1, l2 = ([r["loss"] for r in run] for run in runs)
    assert len(l1) == 8
    np.testing.assert_allclose(l2, l1, rtol=1e-5)
    assert all(r["queries"] > 0 for r in runs[0])


def test_contiguous_split_is_even_and_covers():
    for n, parts in [(10, 3), (3, 5), (0, 2), (192, 8)]:
        b = contiguous_split(n, parts)
        sizes = [b[i + 1] - b[i] for i in range(parts)]
        assert b[0] == 0 and b[-1] == n and max(sizes) - min(sizes) <= 1


def test_queries_leave_running_statistics_and_the_driver_updates_them():
    """One CGE step on a BatchNorm model: running statistics must equal exactly one train-mode
    forward of the batch from their initial values (queries never touch them; the driver's
    update is not skipped)."""
    import copy

    from zohpc.comm import world
    from zohpc.models import build_model
    from zohpc.steps import CGEStep
    from zohpc.zo import Coordinates, QueryEngine

    torch.manual_seed(0)
    model = build_model("resnet20", (3, 8, 8), 10)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 3, 8, 8, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.train()
        reference(x)
    coords = Coordinates(model, {n: torch.rand(p.shape, generator=gen) < 0.002 for n, p in model.named_parameters()
                                 if p.dim() > 1})
    # lr 0: the driver's update path runs (optimizer step, one train-mode forward), parameters stay
    step = CGEStep(world(), model, QueryEngine(model, query_batch=8), torch.optim.SGD(model.parameters(), lr=0.0),
                   mu=5e-3)
    step.set_coords(coords, [1.0] * len(coords.counts))
    step(x.clone(), y.clone(), 0)
    ours, theirs = dict(model.named_buffers()), dict(reference.named_buffers())
    assert any("running_mean" in n for n in ours)
    for n in ours:
        assert torch.equal(ours[n], theirs[n]), n


def test_attempt_records_how_a_step_ended():
    """A task error and a task's sys.exit end as an error outcome (settled on every rank: one
    line, exit 2), never as an exit of this rank alone, which would leave the others waiting."""
    import sys

    from zohpc.errors import UserError
    from zohpc.steps.protocol import attempt

    assert attempt(lambda: 5).value == 5 and attempt(lambda: 5).error is None

    def fails():
        raise UserError("task 't': loss is nan")

    assert attempt(fails, " (step 3)").error == "task 't': loss is nan (step 3)"
    assert attempt(lambda: sys.exit(4), " (step 3)").error == "the task's code called sys.exit(4) (step 3)"
    with pytest.raises(RuntimeError):  # anything else still ends the job (MPI_Abort, with a message)
        attempt(lambda: (_ for _ in ()).throw(RuntimeError("bug")))
