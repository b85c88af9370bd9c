"""Stacked full-forward queries and the BatchNorm guard, against plain full forwards in float64."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from zohpc.stop import StepAbandoned
from zohpc.zo import Coordinates, cge
from zohpc.zo.batchnorm import batch_stats_only
from zohpc.zo.stacked import FullForwardEngine, StackedForward

torch.set_num_threads(1)
D64 = torch.float64


class Branchy(nn.Module):
    """Untraceable by torch.fx: a branch on a tensor value and a Python loop whose length is data.

    ``on_activation``: the branch reads an activation (vmap cannot run it: copies loop);
    otherwise it reads the input only (vmap runs it).
    """

    def __init__(self, on_activation: bool):
        super().__init__()
        self.on_activation = on_activation
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        if (h.mean() if self.on_activation else x.sum()) > 0:
            h = h * 1.5
        for _ in range(int(x.shape[0] % 3)):  # a loop on a (shape) value
            h = torch.tanh(h)
        return self.fc(h.flatten(1))


def _problem(on_activation=False, seed=0):
    torch.manual_seed(seed)
    model = Branchy(on_activation).to(D64)
    x = torch.randn(7, 2, 4, 4, dtype=D64)
    y = torch.randint(0, 3, (7,))
    return model, x, y


def _reference_loss(model, x, y, flat_delta=None):
    """Plain full forward of a perturbed deep copy, BatchNorm with batch statistics."""
    net = copy.deepcopy(model)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
            m.track_running_stats = False
            m.running_mean = m.running_var = None
    if flat_delta is not None:
        with torch.no_grad():
            vec = torch.nn.utils.parameters_to_vector(net.parameters())
            torch.nn.utils.vector_to_parameters(vec + flat_delta, net.parameters())
    with torch.no_grad():
        return F.cross_entropy(net(x), y)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, saved):
    now = model.state_dict()
    return set(now) == set(saved) and all(torch.equal(now[k], saved[k]) for k in saved)


def test_models_are_untraceable():
    for on_activation in (False, True):
        with pytest.raises(Exception):
            fx.symbolic_trace(Branchy(on_activation))


# ---------------------------------------------------------------------------- BatchNorm guard
def test_batch_stats_only_leaves_running_stats_and_modes_exactly():
    model, x, _ = _problem()
    model.eval()
    bn = model.bn
    mean, var, count = bn.running_mean, bn.running_var, bn.num_batches_tracked
    saved = _state(model)
    with torch.no_grad(), batch_stats_only(model):
        out = model(x)
        assert bn.training  # batch statistics
    assert _same_state(model, saved) and not bn.training and not model.training
    assert bn.running_mean is mean and bn.running_var is var and bn.num_batches_tracked is count
    # the outputs used batch statistics, not the running ones
    h = model.conv(x)
    ref = F.batch_norm(h, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert torch.allclose(model.bn(h), F.batch_norm(h, mean, var, bn.weight, bn.bias, False, 0.0, bn.eps))
    with batch_stats_only(model):
        assert torch.allclose(bn(h), ref)
    del out
    # the same forward without the guard (training mode) does move them: the test can fail
    model.train()
    with torch.no_grad():
        model(x)
    assert not torch.equal(model.bn.running_mean, saved["bn.running_mean"])


def test_batch_stats_only_restores_on_exception():
    model, x, _ = _problem()
    model.train()
    saved = _state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with batch_stats_only(model):
            model(x)
            raise RuntimeError("boom")
    assert _same_state(model, saved) and model.bn.track_running_stats and model.bn.running_mean is not None


# ---------------------------------------------------------------------------- StackedForward
@pytest.mark.parametrize("on_activation,stacking", [(False, "vmap"), (True, "loop")])
def test_stacked_losses_match_plain_forwards(on_activation, stacking):
    model, x, y = _problem(on_activation)
    model.train()
    saved = _state(model)
    sf = StackedForward(model, query_batch=4)
    base = sf.prepare(x, y)
    assert sf.stacking == stacking and sf.reason
    assert sf.copies_per_pass == (4 if stacking == "vmap" else 1)
    assert torch.allclose(base, _reference_loss(model, x, y), rtol=0, atol=1e-13)
    deltas = 1e-2 * torch.randn(10, sf.dim, dtype=D64, generator=torch.Generator().manual_seed(1))
    got = sf.losses_of(deltas)
    ref = torch.stack([_reference_loss(model, x, y, d) for d in deltas])
    assert got.shape == (10,) and torch.allclose(got, ref, rtol=0, atol=1e-13)
    assert not torch.allclose(got, base.expand(10))  # the perturbations matter
    assert _same_state(model, saved)  # parameters and BN running statistics untouched


def test_vmap_and_loop_agree_and_memory_cap_limits_copies():
    model, x, y = _problem()
    deltas = 1e-2 * torch.randn(6, sum(p.numel() for p in model.parameters()), dtype=D64)
    stacked = StackedForward(model, query_batch=8)
    stacked.prepare(x, y)
    looped = StackedForward(model, query_batch=8)
    looped.prepare(x, y)
    looped.stacking = "loop"
    assert stacked.copies_per_pass == 8 and looped.copies_per_pass == 1
    assert torch.allclose(stacked.losses_of(deltas), looped.losses_of(deltas), rtol=0, atol=1e-13)
    capped = StackedForward(model, query_batch=8, max_elements=3 * 7 * 4 * 16)  # room for 3 copies
    capped.prepare(x, y)
    assert capped.copies_per_pass == 3


def test_center_moves_the_point_not_the_model():
    model, x, y = _problem()
    saved = _state(model)
    sf = StackedForward(model, query_batch=4)
    shift = 1e-2 * torch.randn(sf.dim, dtype=D64)
    center = torch.nn.utils.parameters_to_vector(model.parameters()).detach() + shift
    base = sf.prepare(x, y, center=center)
    assert torch.allclose(base, _reference_loss(model, x, y, shift), rtol=0, atol=1e-13)
    d = 1e-2 * torch.randn(3, sf.dim, dtype=D64)
    ref = torch.stack([_reference_loss(model, x, y, shift + r) for r in d])
    assert torch.allclose(sf.losses_of(d), ref, rtol=0, atol=1e-13)
    assert _same_state(model, saved)
    # a rank that needs no base loss skips that pass; its queries are the same
    assert sf.prepare(x, y, center=center, base=False) is None and sf.base is None
    assert torch.allclose(sf.losses_of(d), ref, rtol=0, atol=1e-13)


def test_check_runs_between_passes_and_can_abandon():
    model, x, y = _problem()
    sf = StackedForward(model, query_batch=4)
    sf.prepare(x, y)
    calls = []
    sf.losses_of(torch.zeros(10, sf.dim, dtype=D64), check=lambda: calls.append(1))
    assert len(calls) == 3  # passes of 4 + 4 + 2 copies

    def stop():
        raise StepAbandoned()

    with pytest.raises(StepAbandoned):
        sf.losses_of(torch.zeros(2, sf.dim, dtype=D64), check=stop)


# ---------------------------------------------------------------------------- FullForwardEngine
def _coords(model):
    w = model.conv.weight
    mask = torch.rand(w.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    return Coordinates(model, {"conv.weight": mask})


def _coordinate_reference(model, x, y, coords, mu, sign=1):
    offsets, start = [], 0
    for p in model.parameters():
        offsets.append(start)
        start += p.numel()
    out = []
    for pi, flat in coords.runs():
        for i in flat.tolist():
            delta = torch.zeros(start, dtype=D64)
            delta[offsets[pi] + i] = sign * mu
            out.append(_reference_loss(model, x, y, delta))
    return torch.stack(out)


@pytest.mark.parametrize("on_activation", [False, True])
def test_full_forward_engine_matches_plain_forwards(on_activation):
    model, x, y = _problem(on_activation)
    saved = _state(model)
    coords = _coords(model)
    eng = FullForwardEngine(model, query_batch=8)
    eng.prepare(x, y)
    assert eng.feature_tensors() is None and eng.stacking == ("loop" if on_activation else "vmap")
    assert all(eng.query_batch % eng.batch_size(pi) == 0 for pi in range(len(coords.numels)))
    mu = 1e-3
    ref_plus = _coordinate_reference(model, x, y, coords, mu)
    ref_minus = _coordinate_reference(model, x, y, coords, mu, -1)
    assert torch.allclose(eng.losses(coords, 0, coords.total, mu), ref_plus, rtol=0, atol=1e-13)
    plus, minus = eng.central_losses(coords, 0, coords.total, mu)
    assert torch.allclose(plus, ref_plus, rtol=0, atol=1e-13)
    assert torch.allclose(minus, ref_minus, rtol=0, atol=1e-13)
    assert _same_state(model, saved)


def test_full_forward_cge_matches_float64_autograd():
    model, x, y = _problem()
    coords = Coordinates(model)
    eng = FullForwardEngine(model, query_batch=8)
    eng.prepare(x, y)
    est = cge(eng, coords, 1e-5, "central")
    net = copy.deepcopy(model)
    with batch_stats_only(net):
        loss = F.cross_entropy(net(x), y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])
    assert torch.allclose(est, grad, rtol=1e-6, atol=1e-8)
    fwd = cge(eng, coords, 1e-6, "forward")
    assert torch.allclose(fwd, grad, rtol=1e-3, atol=1e-5) and not torch.allclose(fwd, grad, rtol=0, atol=1e-12)


def test_shards_on_query_batch_multiples_are_bit_identical():
    """Any shard starting on a multiple of query_batch within a parameter gives the same bits."""
    torch.manual_seed(0)
    model, x, y = _problem()
    model = model.float()
    x = x.float()
    coords = _coords(model)
    eng = FullForwardEngine(model, query_batch=4)
    eng.prepare(x, y)
    assert eng.batch_size(0) == 4
    whole = eng.losses(coords, 0, coords.total, 1e-2)
    cplus, cminus = eng.central_losses(coords, 0, coords.total, 1e-2)
    cuts = [0]
    for pi in range(len(coords.counts)):
        lo = coords.offsets[pi]
        cuts += list(range(lo, coords.offsets[pi + 1], 8))[1:] + [coords.offsets[pi + 1]]
    cuts = sorted(set(cuts))
    pieces = [eng.losses(coords, a, b, 1e-2) for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    central = [eng.central_losses(coords, a, b, 1e-2) for a, b in zip(cuts[:-1], cuts[1:])]
    assert torch.equal(torch.cat([p for p, _ in central]), cplus)
    assert torch.equal(torch.cat([m for _, m in central]), cminus)


def test_engine_check_is_called_between_passes():
    model, x, y = _problem()
    coords = Coordinates(model)
    eng = FullForwardEngine(model, query_batch=8)
    eng.prepare(x, y)
    calls = []
    eng.check = lambda: calls.append(1)
    eng.losses(coords, 0, 20, 1e-3)
    assert len(calls) == 3  # conv.weight (72 entries): passes of 8, 8, 4

    def stop():
        raise StepAbandoned()

    eng.check = stop
    with pytest.raises(StepAbandoned):
        eng.central_losses(coords, 0, 4, 1e-3)


class _ViewsInput(nn.Module):
    """Flattens its input with .view, which a channels-last batch cannot take."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x):
        return self.fc(x.view(x.shape[0], -1))


def test_layout_falls_back_for_a_model_that_views_its_input():
    torch.manual_seed(0)
    model = _ViewsInput().to(D64)
    _, x, y = _problem()
    sf = StackedForward(model, query_batch=1)
    base = sf.prepare(x, y)
    assert sf.stacking == "loop" and sf._nhwc[tuple(x.shape)] is False
    assert torch.allclose(base, _reference_loss(model, x, y), rtol=0, atol=1e-13)
    d = 1e-2 * torch.randn(2, sf.dim, dtype=D64)
    assert torch.allclose(sf.losses_of(d), torch.stack([_reference_loss(model, x, y, r) for r in d]), rtol=0, atol=1e-13)
    conv, x, y = _problem(on_activation=True)
    looped = StackedForward(conv, query_batch=4)
    looped.prepare(x, y)
    assert looped.stacking == "loop" and looped._nhwc[tuple(x.shape)] is True
