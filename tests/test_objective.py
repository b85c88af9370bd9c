"""The objective at the tail of every query: any targets, black boxes, failures named.

Reference: deep-copy the model, perturb one entry, plain full forward (BatchNorm on batch
statistics), the same objective written in torch, float64.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zohpc.errors import ConfigError, UserError
from zohpc.models import build_model
from zohpc.zo import Coordinates, Objective, ObjectiveError, QueryEngine, cge
from zohpc.zo.objective import cross_entropy_reference


def _batch_stats_copy(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.track_running_stats = False
    return m.train()


def mse_torch(out, t):
    return ((out - t) ** 2).mean()


def mse_numpy(out, t):
    """A true black box: numpy on detached values, no autograd path."""
    a = out.detach().cpu().numpy()
    return float(np.mean((a - t.cpu().numpy()) ** 2))


def mse_batched(out, t):
    return ((out - t.unsqueeze(0)) ** 2).flatten(1).mean(1)


@torch.no_grad()
def reference(model, pi, flat, step, x, y, fn):
    m = _batch_stats_copy(model)
    list(m.parameters())[pi].view(-1)[flat] += step
    return float(fn(m(x), y))


def _regression(name="digits_cnn", shape=(1, 8, 8), batch=12, k=3, seed=0):
    torch.manual_seed(seed)
    m = build_model(name, shape, k).double().train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    y = torch.randn(batch, k, generator=g, dtype=torch.float64)  # regression targets (B, k)
    return m, x, y


def _autograd(m, x, y, fn):
    mm = _batch_stats_copy(m)
    mm.zero_grad()
    fn(mm(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in mm.parameters()])


def _assert_all_coordinates_match(m, x, y, obj, query_batch, mu):
    """Every coordinate's query through the engine equals the reference (MSE in torch, float64)."""
    coords = Coordinates(m)
    eng = QueryEngine(m, obj, query_batch=query_batch)
    eng.prepare(x, y)
    got = eng.losses(coords, 0, coords.total, mu)
    refs = [reference(m, pi, f, mu, x, y, mse_torch) for pi, flat in coords.runs() for f in flat.tolist()]
    assert torch.allclose(got, torch.tensor(refs, dtype=torch.float64), rtol=1e-12, atol=0)


def test_cge_through_numpy_black_box_matches_autograd():
    m, x, y = _regression()
    coords = Coordinates(m)
    eng = QueryEngine(m, Objective(loss=mse_numpy, name="regress"), query_batch=16)
    eng.prepare(x, y)
    assert abs(float(eng.base) - reference(m, 0, 0, 0.0, x, y, mse_torch)) < 1e-12
    g = cge(eng, coords, 1e-6, "central")
    true = _autograd(m, x, y, mse_torch)
    assert ((g - true).norm() / true.norm()).item() <= 1e-6
    # the same through the batched torch objective
    eng_b = QueryEngine(m, Objective(batched=mse_batched, name="regress"), query_batch=16)
    eng_b.prepare(x, y)
    gb = cge(eng_b, coords, 1e-6, "central")
    assert ((gb - true).norm() / true.norm()).item() <= 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_batched_equals_per_copy_equals_reference_resnet(dtype, tol):
    m, x, y = _regression("resnet20", (3, 16, 16), batch=3, k=4)
    m, x, y = m.to(dtype), x.to(dtype), y.to(dtype)
    g = torch.Generator().manual_seed(2)
    masks, picked = {}, []
    for pi, (name, p) in enumerate(m.named_parameters()):  # 1 coordinate in every tensor
        f = int(torch.randint(0, p.numel(), (1,), generator=g))
        mk = torch.zeros(p.numel(), dtype=torch.bool)
        mk[f] = True
        masks[name] = mk.view(p.shape)
        picked.append((pi, f))
    coords = Coordinates(m, masks)
    mu = 1e-2
    m64 = copy.deepcopy(m).double()
    refs = torch.tensor([reference(m64, pi, f, mu, x.double(), y.double(), mse_torch) for pi, f in picked],
                        dtype=torch.float64)
    got = {}
    for kind, obj in (("batched", Objective(batched=mse_batched)), ("per_copy", Objective(loss=mse_numpy)),
                      ("per_copy_torch", Objective(loss=mse_torch))):
        eng = QueryEngine(m, obj, query_batch=7)
        eng.prepare(x, y)
        got[kind] = eng.losses(coords, 0, coords.total, mu).double()
        rel = ((got[kind] - refs).abs() / refs.abs()).max().item()
        assert rel <= tol, (kind, rel)
    assert torch.allclose(got["batched"], got["per_copy"], rtol=tol, atol=0)


def test_default_objective_is_cross_entropy():
    torch.manual_seed(0)
    out = torch.randn(3 * 5, 4, dtype=torch.float64)
    y = torch.randint(0, 4, (5,))
    v = Objective()(out, y, 3)
    ref = [cross_entropy_reference(out[5 * q:5 * q + 5], y) for q in range(3)]
    assert torch.allclose(v, torch.tensor(ref, dtype=torch.float64), rtol=1e-13, atol=0)
    per = Objective(loss=lambda o, t: F.cross_entropy(o, t), name="ce")(out, y, 3)
    assert torch.allclose(v, per, rtol=1e-13, atol=0)


def test_image_targets_and_a_non_logit_output():
    """A fully convolutional model (output (B, 1, H, W)) fitted to images; output ends in BN."""

    class Denoise(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 4, 3, padding=1)
            self.b1 = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 2, 3, padding=1)
            self.b2 = nn.BatchNorm2d(2)

        def forward(self, x):
            return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))

    torch.manual_seed(3)
    m = Denoise().double()
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    y = torch.randn(4, 2, 6, 6, dtype=torch.float64)  # image targets
    for obj in (Objective(loss=mse_numpy, name="denoise"), Objective(batched=mse_batched, name="denoise")):
        _assert_all_coordinates_match(m, x, y, obj, query_batch=6, mu=0.03)


def test_generic_op_at_the_output():
    """An op the engine runs copy by copy (LayerNorm) last: the per-copy outputs are stacked."""

    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(5, 6)
            self.ln = nn.LayerNorm(6)

        def forward(self, x):
            return self.ln(self.fc(x))

    torch.manual_seed(4)
    m = Tail().double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randn(7, 6, dtype=torch.float64)
    _assert_all_coordinates_match(m, x, y, Objective(loss=mse_numpy), query_batch=4, mu=0.05)


def _small():
    m, x, y = _regression(batch=6)
    return m, x, y, Coordinates(m)


@pytest.mark.parametrize("obj,match", [
    (Objective(loss=lambda o, t: float("nan"), name="mytask"), "task 'mytask': loss is nan"),
    (Objective(loss=lambda o, t: np.ones(2), name="mytask"), "task 'mytask': loss returned an array of shape"),
    (Objective(loss=lambda o, t: "1.0", name="mytask"), "task 'mytask': loss returned str"),
    (Objective(loss=lambda o, t: 1 / 0, name="mytask"), "task 'mytask': loss raised ZeroDivisionError"),
    (Objective(batched=lambda o, t: o.flatten(1).mean(1, keepdim=True), name="mytask"),
     r"task 'mytask': batched_loss returned \(1, 1\) for 1 copies"),
    (Objective(batched=lambda o, t: [1.0], name="mytask"), "task 'mytask': batched_loss returned list"),
])
def test_bad_objective_named_at_prepare(obj, match):
    m, x, y, _ = _small()
    eng = QueryEngine(m, obj)
    with pytest.raises(ObjectiveError, match=match) as info:
        eng.prepare(x, y)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    with pytest.raises(RuntimeError, match="prepare"):  # not half-prepared
        eng.losses(Coordinates(m), 0, 1)


def test_objective_failing_in_a_query():
    """Finite base loss, then inf for a perturbed copy: the query names the task."""
    m, x, y, coords = _small()
    base = {"n": 0}

    def flaky(out, t):
        base["n"] += 1
        return float("inf") if base["n"] > 1 else mse_numpy(out, t)

    eng = QueryEngine(m, Objective(loss=flaky, name="flaky"), query_batch=4)
    eng.prepare(x, y)
    with pytest.raises(ObjectiveError, match="task 'flaky': loss is inf"):
        eng.losses(coords, 0, 4)


def test_objective_type_checked():
    m, *_ = _small()
    with pytest.raises(TypeError, match="Objective"):
        QueryEngine(m, mse_numpy)


def test_output_must_be_one_batched_tensor():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x), x

    with pytest.raises(ConfigError, match="forward returns tuple"):
        QueryEngine(Pair())

    class Scalar(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x).sum()

    eng = QueryEngine(Scalar(), Objective(loss=lambda o, t: o))
    with pytest.raises(ConfigError, match=r"output has shape \(\) for a batch of 4"):
        eng.prepare(torch.randn(4, 3), torch.zeros(4))


def test_stop_check_between_black_box_copies():
    """A slow black box (an external program per copy) is interrupted between copies."""
    from zohpc.stop import StepAbandoned

    m, x, y, coords = _small()
    copies = {"n": 0}

    def slow(out, t):
        copies["n"] += 1
        return mse_numpy(out, t)

    eng = QueryEngine(m, Objective(loss=slow), query_batch=8)
    eng.prepare(x, y)
    checks = {"n": 0}

    def stop_at_fifth():
        checks["n"] += 1
        if checks["n"] == 5:
            raise StepAbandoned("stop")

    eng.check = stop_at_fifth
    copies["n"] = 0
    with pytest.raises(StepAbandoned):
        eng.losses(coords, 0, 8)
    assert copies["n"] == 3  # check before the pass, then before copies 1..4: stopped before copy 4
