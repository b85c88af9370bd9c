"""The estimators and engines on every available device against float64 autograd, bit-identity
across rank counts on one device type, and resume across devices.

Parametrized over the devices: ``cpu`` always, ``cuda`` with the ``cuda`` marker, skipped
without a CUDA device (``python -m zohpc.bench device`` runs them on a GPU). The references
are computed on the CPU in float64; the device runs in float64 too, so the tolerances are
those of the finite differences, not of the device's arithmetic.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpi_util import ROOT, run_ranks
from zohpc.models import build_model
from zohpc.zo import Coordinates, QueryEngine, cge
from zohpc.zo.rge import direction, directions, rge_coefficients, rge_combine, sharded_losses
from zohpc.zo.stacked import FullForwardEngine, StackedForward

HAS_CUDA = torch.cuda.is_available()
CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")])
DEVICES = ["cpu", CUDA]
SCRIPT = os.path.join(ROOT, "tests", "scripts", "mpi_gradient.py")


def _batch_stats(model):
    """A copy whose train-mode forward uses batch statistics and updates nothing."""
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.track_running_stats = False
    return m.train()


def _problem(device, name="digits_cnn", shape=(1, 8, 8), batch=16):
    torch.manual_seed(0)
    cpu = build_model(name, shape, 10).double().train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=g)
    return cpu, copy.deepcopy(cpu).to(device), x, y


def _autograd(cpu_model, x, y):
    m = _batch_stats(cpu_model)
    F.cross_entropy(m(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in m.parameters()])


def _rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine_kind", ["feature-reuse", "stacked"])
def test_cge_engines_match_float64_autograd(device, engine_kind):
    cpu, model, x, y = _problem(device)
    coords = Coordinates(model)
    engine = QueryEngine(model, query_batch=8) if engine_kind == "feature-reuse" else FullForwardEngine(model, None, 8)
    engine.prepare(x.to(device), y.to(device))
    g = cge(engine, coords, 1e-7, "central")
    assert g.device.type == device
    assert _rel(g, _autograd(cpu, x, y)) <= 1e-4
    assert _rel(cge(engine, coords, 1e-8, "forward"), _autograd(cpu, x, y)) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_rge_directions_on_device_and_estimate_matches_float64_autograd(device):
    cpu, model, x, y = _problem(device)
    fwd = StackedForward(model, None, 4)
    dim, parts, q, mu = fwd.dim, (0, 7), 12, 1e-7
    assert direction(dim, parts, 3, device=device).device.type == device
    base = float(fwd.prepare(x.to(device), y.to(device)))
    losses = sharded_losses(fwd, dim, parts, q, mu)
    g = rge_combine(rge_coefficients((losses - base) / mu, dim), dim, parts, device=device)
    assert g.device.type == device
    u = directions(dim, parts, 0, q, device=device).cpu()  # the same directions the losses used
    true = _autograd(cpu, x, y)
    reference = (dim / q) * ((u @ true)[:, None] * u).sum(0)
    assert _rel(g, reference) <= 1e-4


@pytest.mark.parametrize("device", DEVICES)
def test_spsa_perturbation_on_device_matches_float64_autograd(device):
    from zohpc.zo import spsa

    cpu, model, x, y = _problem(device)
    m = _batch_stats(model)
    params = spsa.trainable(m)
    parts, mu = (0, 5), 1e-6
    z = [spsa.direction(p, parts, 0, i) for i, p in enumerate(params)]
    assert all(v.device.type == device for v in z)
    xd, yd = x.to(device), y.to(device)
    with torch.no_grad():
        with spsa.perturbed(m, parts, 0, mu):
            plus = float(F.cross_entropy(m(xd), yd))
        with spsa.perturbed(m, parts, 0, -mu):
            minus = float(F.cross_entropy(m(xd), yd))
        ref = _batch_stats(cpu)  # the same point built by hand on the CPU
        for p, v in zip(ref.parameters(), z):
            p.add_(mu * v.cpu())
        assert abs(plus - float(F.cross_entropy(ref(x), y))) <= 1e-12 * abs(plus)
    directional = float(_autograd(cpu, x, y) @ torch.cat([v.reshape(-1).cpu() for v in z]))
    assert abs((plus - minus) / (2 * mu) - directional) <= 1e-5 * abs(directional)


@pytest.mark.parametrize("device", [pytest.param("cpu", marks=pytest.mark.slow), CUDA])
def test_cge_gradient_bit_identical_across_rank_counts(tmp_path, device):
    """1 rank, 2 ranks (recompute), 2 ranks (broadcast): one device type, the same bits (on a
    GPU the two ranks share it). The CPU case is tests/test_steps.py's, here marked slow."""
    got = []
    for k, features in [(1, "recompute"), (2, "recompute"), (2, "broadcast")]:
        out = tmp_path / f"g{k}{features}.npy"
        proc = run_ranks(k, [SCRIPT, "digits_cnn", features, str(out), device])
        assert proc.returncode == 0, proc.stderr
        got.append(np.load(out, allow_pickle=False))
    for other in got[1:]:
        np.testing.assert_array_equal(other, got[0])


RESUME = ["--set", "train.epochs=2", "--set", "data.limit=256", "--set", "data.batch_size=64", "--set",
          "prune.queries=16", "--set", "train.log_every_seconds=1000"]


def _train(run_dir, device, *extra):
    return run_ranks(1, ["-m", "zohpc.train", "--out", str(run_dir), *RESUME, "--set", f"train.device={device}",
                         *extra], timeout=300)


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
@pytest.mark.parametrize("first,then", [("cuda", "cuda"), ("cuda", "cpu"), ("cpu", "cuda")])
def test_resume_across_devices(tmp_path, first, then):
    """A checkpoint written on one device resumes on the other; on the same device the resumed
    run is bit-identical to the uninterrupted one (the CPU-only case: tests/test_resume.py)."""
    from zohpc import checkpoint as ckpt

    split = tmp_path / "split"
    p = _train(split, first, "--set", "train.max_steps=4")
    assert p.returncode == 0, p.stderr
    p = _train(split, then, "--resume", "auto")
    assert p.returncode == 0, p.stderr
    resumed = ckpt.load_checkpoint(ckpt.list_checkpoints(str(split))[0])
    assert resumed.step == 8
    assert all(torch.isfinite(t).all() for t in resumed.params.values())
    if first == then:
        full = tmp_path / "full"
        assert _train(full, first).returncode == 0
        whole = ckpt.load_checkpoint(ckpt.list_checkpoints(str(full))[0])
        for name, t in whole.params.items():
            assert torch.equal(t, resumed.params[name]), name


def test_cuda_aware_override_and_bad_value(monkeypatch):
    from zohpc.comm import cuda_aware_mpi
    from zohpc.errors import UserError

    monkeypatch.setenv("ZOHPC_CUDA_AWARE_MPI", "1")
    assert cuda_aware_mpi() is True
    monkeypatch.setenv("ZOHPC_CUDA_AWARE_MPI", "0")
    assert cuda_aware_mpi() is False
    monkeypatch.setenv("ZOHPC_CUDA_AWARE_MPI", "yes")
    with pytest.raises(UserError, match="ZOHPC_CUDA_AWARE_MPI"):
        cuda_aware_mpi()
    monkeypatch.delenv("ZOHPC_CUDA_AWARE_MPI")
    assert cuda_aware_mpi() in (True, False)  # the library's own answer


def test_clock_choice_and_bad_value(monkeypatch):
    import time

    from zohpc import timing
    from zohpc.errors import UserError

    monkeypatch.setenv("ZOHPC_CLOCK", "cpu")
    t0 = time.perf_counter()
    _, sec = timing.timed(lambda: time.sleep(0.05), "cpu")
    assert time.perf_counter() - t0 >= 0.05 and sec < 0.04  # sleeping uses no CPU time
    monkeypatch.setenv("ZOHPC_CLOCK", "wall")
    assert timing.timed(lambda: time.sleep(0.05))[1] >= 0.05
    monkeypatch.setenv("ZOHPC_CLOCK", "gpu")
    with pytest.raises(UserError, match="ZOHPC_CLOCK"):
        timing.now()


@pytest.mark.skipif(HAS_CUDA, reason="the GPU run is the benchmark itself")
def test_bench_device_without_cuda_says_what_it_skipped(capsys):
    import json

    from zohpc.bench.device import build_parser, run
    from zohpc.comm import world

    assert run(world(), build_parser().parse_args(["--json"])) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cuda"] is False and "device figures not measured" in out["note"]
    assert set(out["skipped"]) == {"tests", "peak", "engine", "step", "sharing", "precision"}
