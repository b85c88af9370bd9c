"""The cost model: plan work from shapes alone against real queries, calibrated costs against timings."""

from __future__ import annotations


import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zohpc.models import build_model
from zohpc.stop import StepAbandoned
from zohpc.zo import Coordinates, QueryEngine, calibrated_costs, plan_flops
from zohpc.zo.costs import _fit, calibrate, measured_costs, time_pass
from zohpc.zo.reps import Chan, Full


class Mixed(nn.Module):
    """Paths the zoo lacks: grouped conv, pad (channel shift), slicing, cat, a generic op, 1-D BN."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.gconv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.conv2 = nn.Conv2d(6, 6, 1)
        self.fc = nn.Linear(6 * 4 * 4, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.ln = nn.LayerNorm(5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        s = F.pad(h[:, :, ::2, ::2], (0, 0, 0, 0, 1, 1))  # shortcut with zero channels, as option A
        g = self.gconv(h)[:, :, 1:5, 1:5] + s[:, 1:5]
        c = torch.cat([g, s[:, :2]], 1)
        return self.ln(self.bn1(self.fc(torch.flatten(self.conv2(c), 1))))


def _engine(name, shape, batch, qb=5):
    torch.manual_seed(0)
    m = Mixed().double() if name == "mixed" else build_model(name, shape, 10).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *shape, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5 if name == "mixed" else 10, (batch,), generator=g)
    eng = QueryEngine(m, query_batch=qb)
    eng.prepare(x, y)
    return m, x, y, eng


@pytest.mark.parametrize("name,shape", [("digits_cnn", (1, 8, 8)), ("cnn_d3", (3, 16, 16)),
                                        ("resnet20", (3, 16, 16)), ("mixed", (2, 8, 8))])
def test_plan_work_matches_real_queries(name, shape):
    """Sizes found from shapes equal the largest tensor a real query holds; conv/linear FLOPs
    equal those the engine counts while running it (FLOPs grow with the stacked copies)."""
    m, x, y, eng = _engine(name, shape, batch=3)
    Q = 2

    def kind(rep):
        return ("chan", rep.s) if isinstance(rep, Chan) else "full" if isinstance(rep, Full) else "per"

    for pi, plan in enumerate(eng.plans):
        eng.flops = 0
        eng.trace = {}  # the executor records the concrete rep of every node it runs
        eng.query(pi, [0, eng.params[pi].numel() - 1], [0.01, -0.01])
        want = {n: (r[:2] if isinstance(r, tuple) else r) for n, r in plan.reps.items()}
        assert {n: kind(r) for n, r in eng.trace.items()} == want, eng.param_names[pi]
        assert plan.elems == eng.last_elems, eng.param_names[pi]
        if name != "mixed":  # (generic convs run copy by copy are not counted by the engine)
            assert plan.flops * Q == eng.flops, eng.param_names[pi]
        assert plan.flops + plan.moves > 0 and plan.pass_ops + plan.copy_ops > 0
    if name == "mixed":
        kinds = {eng.param_names[pi]: (p.pass_ops, p.copy_ops) for pi, p in enumerate(eng.plans)}
        assert kinds["ln.weight"] == (0, 1) and kinds["conv.weight"][1] > 0
    # batch sizes follow the sizes: an early plan stacks fewer copies under a small cap
    eng.max_elements = max(p.elems for p in eng.plans)
    assert eng.batch_size(0) == 1 and eng.batch_size(len(eng.plans) - 1) == eng.query_batch


def test_plan_flops_orders_layers():
    m, x, y, eng = _engine("resnet20", (3, 16, 16), batch=2)
    f = plan_flops(eng)
    names = eng.param_names
    first, last = names.index("conv1.weight"), names.index("fc.bias")
    assert f[first] == max(f) and f[last] < f[names.index("fc.weight")] < f[first] / 100


def test_fit_recovers_and_stays_non_negative():
    pts = [(f, 2e-9 * f + 3e-5) for f in (1e3, 1e5, 1e7, 1e9)]
    a, b = _fit(pts)
    assert a == pytest.approx(2e-9, rel=1e-9) and b == pytest.approx(3e-5, rel=1e-6)
    a, b = _fit([(1.0, 5.0), (10.0, 1.0)])  # decreasing: the unconstrained slope is negative
    assert a >= 0 and b > 0
    a, b = _fit([(0.0, 1e-3)])
    assert a >= 0 and b == pytest.approx(1e-3)


def _spearman(a, b):
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.parametrize("name,batch", [("cnn_d5", 64), ("resnet20", 16)])
def test_calibrated_costs_rank_and_scale_like_measured(name, batch):
    torch.manual_seed(0)
    m = build_model(name, (3, 32, 32), 10)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    coords = Coordinates(m)
    eng = QueryEngine(m, query_batch=16)
    passes = {"n": 0}
    real_query = eng.query

    def counted(*a, **k):
        passes["n"] += 1
        return real_query(*a, **k)

    eng.query = counted
    cal = calibrate(eng, coords, x, y, budget_seconds=1.0)
    del eng.query
    pred = np.array(cal.costs(eng, coords))
    assert len(cal.samples) >= 3 and cal.a > 0
    # a few passes, not one per parameter (1 warm-up, at most 9 samples of at most 3 passes)
    assert passes["n"] <= 1 + 3 * len(cal.samples) and len(cal.samples) <= 9 < len(pred)
    # measured reference on a sample of parameters (every one would take long on resnet20)
    sample = list(range(0, len(pred), 2 if name == "cnn_d5" else 4)) + [len(pred) - 1]
    meas = np.array(measured_costs(eng, coords, x, y, repeats=2, only=sample))[sample]
    sp = _spearman(pred[sample], meas)
    ratio = pred[sample].sum() / meas.sum()
    assert sp >= 0.8, (sp, pred[sample], meas)
    assert 0.5 <= ratio <= 2.0, ratio
    assert calibrated_costs(eng, coords, budget_seconds=0.2)[0] > 0  # prepared engine: x may be omitted


def test_inactive_parameters_cost_nothing_and_stop_check():
    m, x, y, eng = _engine("digits_cnn", (1, 8, 8), batch=4)
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in m.named_parameters() if n.endswith("bias")}
    coords = Coordinates(m, masks)
    costs = calibrated_costs(eng, coords, x, y, budget_seconds=0.3)
    for n, c in zip(coords.param_names, costs):
        assert (c == 0.0) == n.endswith("bias"), n
    calls = {"n": 0}

    def stop_at_second():
        calls["n"] += 1
        if calls["n"] == 2:
            raise StepAbandoned("stop")

    with pytest.raises(StepAbandoned):
        calibrated_costs(eng, coords, x, y, budget_seconds=0.3, check=stop_at_second)
    assert time_pass(eng, coords, 0) > 0  # still usable


def test_measured_costs_only_and_inactive():
    m, x, y, eng = _engine("digits_cnn", (1, 8, 8), batch=4)
    coords = Coordinates(m, {"fc.bias": torch.zeros(10, dtype=torch.bool)})
    costs = measured_costs(eng, coords, x, y, repeats=1, only=[0, 1, len(coords.counts) - 1])
    assert costs[0] > 0 and costs[1] > 0 and costs[2] == 0.0  # not asked
    assert costs[-1] == 0.0  # fc.bias: no active coordinate
