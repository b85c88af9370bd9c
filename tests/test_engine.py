"""The ZO query engine against a slow, obviously-right reference.

Reference: deep-copy the model, add the perturbation to one parameter entry, run the plain
full forward with BatchNorm on batch statistics (running stats untouched), cross entropy.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zohpc.errors import UserError
from zohpc.models import MODEL_NAMES, build_model
from zohpc.zo import Coordinates, FullForwardEngine, QueryEngine, cge, check_deterministic

CASES = [
    ("digits_cnn", (1, 8, 8), 16),
    ("cnn_d1", (3, 16, 16), 8),
    ("cnn_d2", (3, 16, 16), 8),
    ("cnn_d3", (3, 16, 16), 6),
    ("cnn_d4", (3, 16, 16), 6),
    ("cnn_d5", (3, 32, 32), 4),
    ("resnet20", (3, 32, 32), 3),
]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _batch_stats_copy(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.track_running_stats = False  # train mode then uses batch stats, updates nothing
    return m.train()


@torch.no_grad()
def reference_loss(model, pi, flat, step, x, y):
    m = _batch_stats_copy(model)
    list(m.parameters())[pi].view(-1)[flat] += step
    return F.cross_entropy(m(x), y)


def _setup(name, shape, batch, dtype, seed=0):
    torch.manual_seed(seed)
    m = build_model(name, shape, 10).to(dtype)
    m.train()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, *shape, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (batch,), generator=g)
    return m, x, y


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_state_equal(before, model):
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"{k} changed"


def test_zoo_is_covered():
    covered = {c[0] for c in CASES}
    assert covered | {f"resnet{d}" for d in (32, 44, 56, 110)} == set(MODEL_NAMES)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name,shape,batch", CASES)
def test_losses_match_reference_every_parameter(name, shape, batch, dtype):
    m, x, y = _setup(name, shape, batch, dtype)
    before = _state(m)
    g = torch.Generator().manual_seed(3)
    k = 2 if name == "resnet20" else 4
    masks, picked = {}, []
    for pi, (pname, p) in enumerate(m.named_parameters()):
        local = torch.randperm(p.numel(), generator=g)[:k].sort().values
        mask = torch.zeros(p.numel(), dtype=torch.bool)
        mask[local] = True
        masks[pname] = mask.view(p.shape)
        picked += [(pi, int(f)) for f in local]
    coords = Coordinates(m, masks)  # a sample of coordinates in every parameter tensor
    assert coords.total == len(picked)
    mu = 1e-2
    refs = torch.stack([reference_loss(m, pi, f, mu, x, y) for pi, f in picked])
    ref0 = reference_loss(m, 0, 0, 0.0, x, y)
    for qb in (1, 7):
        eng = QueryEngine(m, query_batch=qb)
        base = eng.prepare(x, y)
        assert abs(base - ref0) <= TOL[dtype] * abs(ref0)
        got = eng.losses(coords, 0, coords.total, mu)
        rel = (got - refs).abs() / refs.abs()
        worst = int(rel.argmax())
        assert rel[worst].item() <= TOL[dtype], (coords.param_names[picked[worst][0]], qb, rel[worst].item())
    _assert_state_equal(before, m)


def test_negative_sign_and_fc_params():
    m, x, y = _setup("digits_cnn", (1, 8, 8), 8, torch.float64)
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=5)
    eng.prepare(x, y)
    pi = coords.param_names.index("fc.weight")
    got = eng.losses(coords, coords.offsets[pi], coords.offsets[pi] + 9, 0.05, sign=-1)
    refs = torch.stack([reference_loss(m, pi, f, -0.05, x, y) for f in range(9)])
    assert torch.allclose(got, refs, rtol=1e-12, atol=0)


def _autograd_grad(m, x, y):
    mm = _batch_stats_copy(m)
    mm.zero_grad()
    F.cross_entropy(mm(x), y).backward()
    return torch.cat([p.grad.reshape(-1) for p in mm.parameters()])


def test_cge_matches_autograd_digits_all_coordinates():
    m, x, y = _setup("digits_cnn", (1, 8, 8), 32, torch.float64)
    before = _state(m)
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=16)
    eng.prepare(x, y)
    # mu small enough that no ReLU / max-pool kink lies within +-mu of any query point
    g = cge(eng, coords, 1e-7, "central")
    true = _autograd_grad(m, x, y)
    assert g.shape == true.shape
    assert ((g - true).norm() / true.norm()).item() <= 1e-4
    fwd = cge(eng, coords, 1e-8, "forward")
    assert ((fwd - true).norm() / true.norm()).item() <= 1e-4
    _assert_state_equal(before, m)  # params, running_mean/var, num_batches_tracked bit-identical


def test_cge_matches_autograd_resnet20_sampled():
    m, x, y = _setup("resnet20", (3, 32, 32), 4, torch.float64)
    for mod in m.modules():  # non-trivial running stats to check they stay untouched
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-1, 1)
            mod.num_batches_tracked += 3
    before = _state(m)
    mask_gen = torch.Generator().manual_seed(5)
    masks = {}  # ~300 coordinates, at least one in every parameter tensor (BN ones included)
    for n, p in m.named_parameters():
        mk = torch.rand(p.shape, generator=mask_gen) < 0.001
        mk.view(-1)[torch.randint(0, p.numel(), (1,), generator=mask_gen)] = True
        masks[n] = mk
    coords = Coordinates(m, masks)
    eng = QueryEngine(m, query_batch=12)
    eng.prepare(x, y)
    g = cge(eng, coords, 1e-6, "central")
    true = coords.gather(torch.split(_autograd_grad(m, x, y), coords.numels))
    assert ((g - true).norm() / true.norm()).item() <= 1e-4
    # a shard in the middle equals the same slice of the whole
    part = cge(eng, coords, 1e-6, "central", start=50, stop=130)
    assert torch.allclose(part, g[50:130], rtol=1e-9, atol=1e-9)
    _assert_state_equal(before, m)


def test_dropout_refused():
    check_deterministic(nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.0)))  # p = 0: an identity, accepted
    m = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 2))
    with pytest.raises(UserError, match="Dropout"):
        check_deterministic(m)
    with pytest.raises(UserError, match="2"):
        QueryEngine(m)
    m[2].p = 0.0  # dropout with p == 0 returns its input: deterministic (transformer layers carry it)
    check_deterministic(m)

    class FunctionalDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.dropout(x, 0.1))

    with pytest.raises(UserError, match="dropout"):
        QueryEngine(FunctionalDropout())


def test_masks_scatter_fill_grad():
    m, x, y = _setup("digits_cnn", (1, 8, 8), 8, torch.float64)
    mask = torch.zeros_like(m.features[0].weight, dtype=torch.bool)
    mask.view(-1)[[3, 10, 11, 40]] = True
    coords = Coordinates(m, {"features.0.weight": mask})
    assert coords.counts[0] == 4
    assert coords.total == sum(p.numel() for p in m.parameters()) - m.features[0].weight.numel() + 4
    assert coords.runs(0, 4)[0][1].tolist() == [3, 10, 11, 40]
    runs = coords.runs(2, 10)
    assert runs[0][0] == 0 and runs[0][1].tolist() == [11, 40] and runs[1][0] == 1
    assert runs[1][1].tolist() == list(range(6))
    vals = torch.arange(1, coords.total + 1, dtype=torch.float64)
    full = coords.scatter(vals)
    assert full[0].reshape(-1)[[3, 10, 11, 40]].tolist() == [1, 2, 3, 4]
    assert int((full[0] != 0).sum()) == 4
    coords.fill_grad(m, vals)
    w = m.features[0].weight
    assert torch.equal(w.grad, full[0]) and int((w.grad != 0).sum()) == 4
    assert torch.equal(coords.gather([p.grad for p in m.parameters()]), vals)
    eng = QueryEngine(m, query_batch=3)
    eng.prepare(x, y)
    got = eng.losses(coords, 0, 4, 0.1)
    refs = torch.stack([reference_loss(m, 0, f, 0.1, x, y) for f in (3, 10, 11, 40)])
    assert torch.allclose(got, refs, rtol=1e-12, atol=0)
    with pytest.raises(UserError, match="features.0.weight"):
        Coordinates(m, {"features.0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(UserError, match="nope"):
        Coordinates(m, {"nope": mask})


@pytest.mark.parametrize("name,shape", [("digits_cnn", (1, 8, 8)), ("resnet20", (3, 32, 32))])
def test_feature_broadcast_path_identical(name, shape):
    m, x, y = _setup(name, shape, 4, torch.float32)
    coords = Coordinates(m)
    sender = QueryEngine(m, query_batch=6)
    base = sender.prepare(x, y)
    feats = sender.feature_tensors()
    receiver = QueryEngine(m, query_batch=6)
    shapes = receiver.feature_shapes(tuple(x.shape))
    assert [(tuple(t.shape), t.dtype) for t in feats] == shapes
    assert torch.equal(feats[0], x)  # the input batch first; targets are not features
    bufs = [torch.empty(s, dtype=d) for s, d in shapes]  # what an MPI receiver allocates
    for b, t in zip(bufs, feats):
        b.copy_(t)
    receiver.load_features(bufs, y.clone(), base.clone())
    idx = torch.linspace(0, coords.total - 1, 60).long()
    for i in idx.tolist():
        a = sender.losses(coords, i, i + 1, 1e-2)
        b = receiver.losses(coords, i, i + 1, 1e-2)
        assert torch.equal(a, b)
    assert torch.equal(cge(sender, coords, 1e-2, start=0, stop=50), cge(receiver, coords, 1e-2, start=0, stop=50))


def test_generic_ops_fall_back_correctly():
    """Unknown ops (a custom leaf, view via size(), cat) still give exact results."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1, groups=2)
            self.bn = nn.BatchNorm2d(4)
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4).view(1, 4, 1, 1))
            self.ln = nn.LayerNorm(6)
            self.fc = nn.Linear(6 * 16 + 6, 3)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))) * self.scale
            h = torch.cat([h, x], 1)
            h = h[:, :, ::2, ::2]
            z = self.ln(h.mean((2, 3)))
            return self.fc(torch.cat([h.reshape(h.size(0), -1), z], 1))

    torch.manual_seed(0)
    m = Odd().double()
    x = torch.randn(5, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=4)
    eng.prepare(x, y)
    g = torch.Generator().manual_seed(0)
    for pi in range(len(coords.param_names)):
        flat = torch.randint(0, coords.counts[pi], (3,), generator=g).tolist()
        got = eng.query(pi, flat, [0.03] * 3)
        for q, f in enumerate(flat):
            ref = reference_loss(m, pi, f, 0.03, x, y)
            assert abs(got[q] - ref) <= 1e-12 * abs(ref), coords.param_names[pi]


def test_aliasing_and_in_place_paths():
    """Views, identities and repeated operands must not be corrupted by in-place updates."""

    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.ident = nn.Identity()
            self.relu = nn.ReLU()
            self.conv2 = nn.Conv2d(4, 4, 1)
            self.fc = nn.Linear(4 * 36, 3)

        def forward(self, x):
            h = self.bn(self.conv(x))
            i = self.ident(h)  # alias of h, used after h's in-place candidate below
            r = self.relu(h)
            s = r + r  # the same operand twice
            t = self.conv2(s) - i  # sub with the alias as second operand
            u = torch.relu(t) * self.ident(t)
            return self.fc(torch.flatten(u[:, :, 1:7, 1:7], 1))

    torch.manual_seed(1)
    m = Alias().double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=5)
    eng.prepare(x, y)
    got = eng.losses(coords, 0, coords.total, 0.05)
    refs = []
    for pi, flat in coords.runs():
        refs += [reference_loss(m, pi, f, 0.05, x, y) for f in flat.tolist()]
    assert torch.allclose(got, torch.stack(refs), rtol=1e-12, atol=0)
    # a cap of one copy per pass gives the same values
    eng1 = QueryEngine(m, query_batch=5, max_elements=1)
    eng1.prepare(x, y)
    assert torch.allclose(eng1.losses(coords, 0, coords.total, 0.05), got, rtol=1e-13, atol=0)


def test_bench_engine_smoke(capsys):
    import json

    from zohpc.bench import engine as bench

    args = bench.build_parser().parse_args(
        ["--model", "digits_cnn", "--batch", "8", "--coords", "40", "--threads", "1", "--json"])
    bench.run(None, args)
    res = json.loads(capsys.readouterr().out)
    for key in ("naive_coords_per_s", "block_reuse_coords_per_s", "engine_coords_per_s", "speedup_vs_naive",
                "speedup_vs_block_reuse", "engine_gflops", "matmul_1thread_gflops"):
        assert res[key] > 0, key
    assert res["coords"] == 40
    assert res["max_rel_error"] <= 1e-5 and res["max_rel_error_block_reuse"] <= 1e-5
    assert res["check_iprobe_coords_per_s"] > 0 and res["check_rate_limited_coords_per_s"] > 0


@pytest.mark.parametrize("task", ["classify", "regress"])
def test_bench_engine_task_smoke(capsys, task):
    import json

    from zohpc.bench import engine as bench

    args = bench.build_parser().parse_args(
        ["--model", "digits_cnn", "--batch", "8", "--coords", "40", "--task", task, "--costs", "--json"])
    bench.run(None, args)
    res = json.loads(capsys.readouterr().out)
    assert res["task"] == task and res["torch_objective_coords_per_s"] > 0
    assert res["blackbox_slowdown"] == pytest.approx(
        res["torch_objective_coords_per_s"] / res["blackbox_objective_coords_per_s"])
    assert res["max_rel_error_blackbox_vs_torch"] <= 1e-5
    assert -1 <= res["costs_spearman"] <= 1 and res["costs_total_ratio"] > 0


def test_stop_check_between_passes_and_engine_usable_after():
    from zohpc.stop import StepAbandoned

    m, x, y = _setup("digits_cnn", (1, 8, 8), 8, torch.float64)
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=8)
    eng.prepare(x, y)
    want = eng.losses(coords, 0, 100, 0.01)
    calls = {"n": 0}

    def counting():
        calls["n"] += 1

    eng.check = counting
    eng.losses(coords, 0, 100, 0.01)
    passes = len(list(eng.groups(coords, 0, 100, eng.batch_size)))
    assert passes > 3 and calls["n"] == passes  # once per stacked pass

    def stop_at_third():
        calls["n"] += 1
        if calls["n"] == 3:
            raise StepAbandoned("stop")

    for run in (lambda: eng.losses(coords, 0, 100, 0.01), lambda: eng.central_losses(coords, 0, 100, 0.01)):
        calls["n"] = 0
        eng.check = stop_at_third
        with pytest.raises(StepAbandoned):
            run()
        assert calls["n"] == 3
    eng.check = counting
    eng.prepare(x, y)  # usable after the abandoned step
    assert torch.equal(eng.losses(coords, 0, 100, 0.01), want)


def test_untraceable_model_one_line_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(UserError) as info:
        QueryEngine(Branchy())
    msg = str(info.value)
    assert msg.startswith("torch.fx cannot trace model Branchy: ") and "\n" not in msg and len(msg) < 220

    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x, z):
            return self.fc(x + z)

    with pytest.raises(UserError, match="model TwoInputs: forward takes 2 inputs"):
        QueryEngine(TwoInputs())


def test_constructor_has_no_process_wide_side_effects(monkeypatch):
    import zohpc.runtime as runtime_mod

    def boom():
        raise AssertionError("QueryEngine must not tune the allocator")

    monkeypatch.setattr(runtime_mod, "tune_malloc", boom)
    m, x, y = _setup("digits_cnn", (1, 8, 8), 4, torch.float32)
    QueryEngine(m).prepare(x, y)


def test_import_installs_no_warning_filter():
    import subprocess
    import sys

    code = ("import warnings, numpy, torch, torch.fx; before = list(warnings.filters); "
            "import zohpc, zohpc.zo, zohpc.zo.engine, "
            "zohpc.zo.costs, zohpc.bench.engine; assert warnings.filters == before, warnings.filters[:3]")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


class _ViewNet(nn.Module):
    """A small CNN whose head reads its features through ``view``/``reshape`` idioms."""

    def __init__(self, idiom):
        super().__init__()
        self.idiom = idiom
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        if self.idiom == "view_size0":
            h = h.view(h.size(0), -1)
        elif self.idiom == "reshape_shape0":
            h = h.reshape(h.shape[0], -1)
        elif self.idiom == "view_minus1":
            h = h.view(-1, 4 * 6 * 6)
        else:  # "view_size0_dims"
            h = h.view(h.size(0), 4, 36).flatten(1)
        return self.fc(h)


@pytest.mark.parametrize("idiom", ["view_size0", "reshape_shape0", "view_minus1", "view_size0_dims"])
def test_view_idioms_on_channels_last_activations(idiom):
    """``x.view(...)`` of a conv output works although the engine keeps activations channels-last,
    and ``x.view(x.size(0), -1)`` keeps the one-channel path into the linear layer."""
    torch.manual_seed(0)
    m = _ViewNet(idiom).double()
    x, y = torch.randn(5, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,))
    coords = Coordinates(m)
    eng, ref = QueryEngine(m, query_batch=4), FullForwardEngine(m, query_batch=4)
    eng.prepare(x, y)
    ref.prepare(x, y)
    assert torch.allclose(eng.losses(coords, 0, coords.total, 1e-3), ref.losses(coords, 0, coords.total, 1e-3),
                          rtol=1e-12, atol=0)
    plan = eng.plans[eng.param_names.index("conv.weight")]
    if idiom != "view_size0_dims":  # (batch, everything else): the one-channel path into the linear layer
        assert "linear_chan" in plan.how.values()
    assert plan.copy_ops == 0
