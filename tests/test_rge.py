"""The one RGE core: regenerated directions, block splits, scaling, accuracy, memory, ranks."""

from __future__ import annotations

import copy
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpi_util import ROOT, run_ranks
from zohpc.stop import StepAbandoned
from zohpc.zo import Coordinates
from zohpc.zo.batchnorm import batch_stats_only
from zohpc.sharding import contiguous_split
from zohpc.zo.rge import (active_scatter, direction, directions, rge_coefficients, rge_combine,
                          rge_losses, sharded_losses)
from zohpc.zo.stacked import StackedForward

torch.set_num_threads(1)
D64 = torch.float64


def _net(dtype=D64):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 16, 4)).to(dtype)


def _batch(dtype=D64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(12, 1, 4, 4, generator=g, dtype=dtype), torch.randint(0, 4, (12,), generator=g)


def _autograd(model, x, y, objective=None):
    net = copy.deepcopy(model)
    with batch_stats_only(net):
        out = net(x)
        loss = F.cross_entropy(out, y) if objective is None else objective(out, y, 1)[0]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])


def test_contiguous_split_covers_balances_and_respects_granule():
    for n in (0, 1, 7, 192, 193):
        for parts in (1, 2, 3, 5):
            for granule in (1, 4, 32):
                b = contiguous_split(n, parts, granule)
                assert len(b) == parts + 1 and b[0] == 0 and b[-1] == n
                assert all(lo <= hi for lo, hi in zip(b[:-1], b[1:]))
                assert all(v % granule == 0 for v in b[:-1] if v < n)
                sizes = [-(-(hi - lo) // granule) for lo, hi in zip(b[:-1], b[1:])]
                assert max(sizes) - min(sizes) <= 1
    assert contiguous_split(10, 3) == [0, 3, 6, 10]  # larger blocks last
    assert contiguous_split(192, 2, 32) == [0, 96, 192]


def test_directions_are_regenerated_identically_and_unit():
    a = direction(50, (3, 7), 5)
    assert torch.equal(a, direction(50, (3, 7), 5)) and a.dtype == D64
    assert abs(float(a.norm()) - 1) < 1e-12
    assert not torch.equal(a, direction(50, (3, 7), 6)) and not torch.equal(a, direction(50, (3, 8), 5))
    assert not torch.equal(a, direction(50, (3, 7), 5, tag="other"))
    block = directions(50, (3, 7), 4, 9)
    assert block.shape == (5, 50) and torch.equal(block[1], a)


class _Spy:
    """An evaluator that records the perturbation blocks it is given: f(x + d) = sum(w * d) + sum(d^2)."""

    def __init__(self, dim, copies):
        self.copies_per_pass = copies
        self.w = torch.linspace(-1, 1, dim, dtype=D64)
        self.rows = []

    def losses_of(self, deltas, check):
        check()
        self.rows.append(deltas.shape[0])
        return deltas @ self.w + (deltas * deltas).sum(1)


def test_blocks_are_aligned_and_splits_are_bit_identical():
    model = _net(torch.float32)
    x, y = _batch(torch.float32)
    sf = StackedForward(model, query_batch=4)
    sf.prepare(x, y)
    assert sf.stacking == "vmap" and sf.copies_per_pass == 4
    whole = rge_losses(sf, sf.dim, (0, 1), 0, 22, 1e-2)
    for parts in (2, 3, 5):
        b = contiguous_split(22, parts, sf.copies_per_pass)
        split = torch.cat([rge_losses(sf, sf.dim, (0, 1), lo, hi, 1e-2) for lo, hi in zip(b[:-1], b[1:])])
        assert torch.equal(split, whole)
    spy = _Spy(30, 4)
    rge_losses(spy, 30, (0,), 2, 13, 1e-2)
    assert spy.rows == [2, 4, 4, 1]  # [2,4) [4,8) [8,12) [12,13): aligned on multiples of 4


def test_check_between_blocks_and_abandon():
    spy = _Spy(30, 4)
    calls = []
    rge_losses(spy, 30, (0,), 0, 10, 1e-2, check=lambda: calls.append(1))
    assert len(calls) == 3

    def stop():
        raise StepAbandoned()

    with pytest.raises(StepAbandoned):
        rge_losses(spy, 30, (0,), 0, 10, 1e-2, check=stop)


def test_combine_is_the_weighted_sum_of_the_directions():
    c = torch.tensor([0.5, -2.0, 0.0, 3.0], dtype=D64)
    u = directions(40, (9,), 0, 4)
    assert torch.allclose(rge_combine(c, 40, (9,)), c @ u, rtol=0, atol=1e-14)
    assert rge_combine(c, 40, (9,), torch.float32).dtype == torch.float32
    assert torch.equal(rge_coefficients(torch.tensor([1.0, 2.0]), 10), torch.tensor([5.0, 10.0], dtype=D64))


def test_central_estimate_is_exact_for_a_quadratic_loss():
    """Central differences are exact on a quadratic: the estimate is (d/q) U^T U grad f."""
    model = nn.Linear(3, 2).to(D64)
    x, y = torch.randn(5, 3, dtype=D64), torch.randn(5, 2, dtype=D64)

    def mse(out, target, Q):
        return ((out.view(Q, -1, 2) - target) ** 2).mean((1, 2))

    sf = StackedForward(model, mse, query_batch=3)
    sf.prepare(x, y)
    d, q, mu = sf.dim, 11, 1e-2
    plus = rge_losses(sf, d, (4, 0), 0, q, mu)
    minus = rge_losses(sf, d, (4, 0), 0, q, -mu)
    g = rge_combine(rge_coefficients((plus - minus) / (2 * mu), d), d, (4, 0))
    u = directions(d, (4, 0), 0, q)
    true = _autograd(model, x, y, mse)
    assert torch.allclose(g, (d / q) * u.T @ (u @ true), rtol=1e-9, atol=1e-11)


def test_estimate_matches_float64_autograd_in_expectation():
    """Unit directions with the d/q scaling: unbiased, so many directions point along the gradient."""
    model = _net()
    x, y = _batch()
    sf = StackedForward(model, query_batch=16)
    base = sf.prepare(x, y)
    d, q, mu = sf.dim, 6000, 1e-6
    diffs = (rge_losses(sf, d, (1, 2), 0, q, mu) - float(base)) / mu
    g = rge_combine(rge_coefficients(diffs, d), d, (1, 2))
    true = _autograd(model, x, y)
    cos = float(g @ true / (g.norm() * true.norm()))
    assert cos > 0.9, cos  # ~ sqrt(q / (q + d)) for d ~ 230
    assert 0.85 < float(g @ true / (true @ true)) < 1.15  # the projection has the gradient's size


def test_masked_scatter_perturbs_only_active_coordinates():
    model = _net()
    mask = torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(0)) < 0.3
    coords = Coordinates(model, {"0.weight": mask})
    scatter = active_scatter(coords)
    block = torch.randn(3, coords.total, dtype=D64)
    full = scatter(block)
    assert full.shape == (3, sum(coords.numels))
    for k in range(3):
        assert torch.equal(torch.cat([t.reshape(-1) for t in coords.scatter(block[k])]), full[k])


def test_directions_are_never_held_q_by_d():
    """Peak memory of q = 40 directions over d = 2M coordinates stays far below q x d floats."""
    code = textwrap.dedent("""
        import resource, torch
        from zohpc.zo.rge import rge_combine, rge_losses
        torch.set_num_threads(1)
        d, q = 2_000_000, 40
        class Ev:
            copies_per_pass = 4
            def losses_of(self, deltas, check):
                return deltas[:, :10].sum(1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        v = rge_losses(Ev(), d, (0,), 0, q, 1e-2)
        g = rge_combine(v, d, (0,))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((peak - before) * 1024)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    grown = int(out.stdout.split()[-1])
    assert grown < 250e6, grown  # q x d float64 would be 640 MB; a block of 4 is 64 MB


SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from test_rge import _batch, _net
    from zohpc.comm import world
    from zohpc.zo.rge import sharded_losses
    from zohpc.zo.stacked import StackedForward
    torch.set_num_threads(1)
    comm = world()
    sf = StackedForward(_net(torch.float32), query_batch=4)
    sf.prepare(*_batch(torch.float32))
    values = sharded_losses(sf, sf.dim, (5, 3), 22, 1e-2, comm)
    if comm.rank == 0:
        torch.save(values, sys.argv[1])
""")


def test_sharded_losses_over_three_ranks_equal_one_process(tmp_path):
    sf = StackedForward(_net(torch.float32), query_batch=4)
    sf.prepare(*_batch(torch.float32))
    ref = sharded_losses(sf, sf.dim, (5, 3), 22, 1e-2)
    script = tmp_path / "sharded.py"
    script.write_text(SCRIPT)
    out = tmp_path / "k3.pt"
    r = run_ranks(3, [str(script), str(out), f"{ROOT}/tests"], timeout=120)
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(out), ref)
