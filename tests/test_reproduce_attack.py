"""The black-box attack task and the ``blackbox_attack`` study."""

import json
import numpy as np
import pytest
import torch
from torch import nn

from mpi_util import run_ranks
from zohpc.tasks.attack import DEFAULTS, Perturbation, attack, make_task, margins
from zohpc.tasks.blackbox import BlackBox, PixelData


class Linear(nn.Module):
    """A known classifier on 1x2x2 images: logits = W x."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.tensor(w, dtype=torch.float32)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def pixel_data(x, y):
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y)
    return PixelData(x, y, x, y, 2, 1.0, (0.0,), (1.0,))


def test_margins_are_true_logit_minus_best_other():
    z = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0], [1.0, 1.0, 0.0]])
    y = np.array([0, 2, 1])
    assert margins(z, y).tolist() == [1.0, -4.0, 0.0]


def test_perturbation_stays_within_budget_and_pixels():
    p = Perturbation((1, 4, 4), 0.1)
    with torch.no_grad():
        p.w.copy_(torch.linspace(-50, 50, 16).view(1, 4, 4))
    x = torch.rand(3, 1, 4, 4)
    with torch.no_grad():
        out = p(x)
    assert float((out - x).abs().max()) <= 0.1 + 1e-6
    assert float(out.min()) >= 0 and float(out.max()) <= 1
    with torch.no_grad():
        assert torch.equal(Perturbation((1, 4, 4), 0.1)(x), x)  # starts at the clean image


def test_task_loss_is_the_black_box_margin():
    clf = Linear([[1, 1, 0, 0], [0, 0, 1, 1]])
    data = pixel_data([[[[0.5, 0.5], [0.2, 0.1]]]], [0])
    task = make_task(clf, data, dict(DEFAULTS, image=0, kappa=0.25))
    x, y = task.train
    assert task.loss(task.model(x), y) == pytest.approx(1.0 - 0.3)
    with torch.no_grad():
        task.model.w.fill_(-20.0)  # every pixel down by 0.1 (clamped at 0)
        task.model.w[0, 1].fill_(20.0)  # second row up by 0.1
    out = task.model(x)
    assert task.loss(out, y) == pytest.approx(max(0.8 - 0.5, -0.25), abs=1e-6)
    assert task.metrics(out, y) == {"success": 0.0, "margin": pytest.approx(0.3, abs=1e-6)}


def test_attack_counts_queries_and_stops_at_the_first_success():
    # class 0 wins by 0.25 at x; raising pixel 2 or 3 flips it: success needs a few steps
    clf = Linear([[1, 1, 0, 0], [0, 0, 1, 1]])
    bb = BlackBox(clf)
    x = torch.tensor([[[0.5, 0.25], [0.25, 0.25]]])

    class Sign:  # exact signed gradient steps of size 0.5 in w, one query per step
        def __init__(self, params):
            self.w = params[0]

        def __call__(self, closure):
            closure()
            with torch.no_grad():
                self.w.add_(torch.tensor([[[-0.5, -0.5], [0.5, 0.5]]]))

    res = attack(bb, x, 0, 0.2, Sign, budget=100)
    assert res["success"] and res["margin"] < 0
    assert res["queries"] == bb.queries  # every black-box call is counted, none hidden
    # margin after k steps: 0.25 - 4 * 0.2 * tanh(0.5 k) < 0 first at k = 1
    assert res["queries"] == 2
    # a budget of one query: the clean image is the only query, no success
    res = attack(BlackBox(clf), x, 0, 0.2, Sign, budget=1)
    assert res == {"success": False, "queries": 1, "margin": pytest.approx(0.25)}


@pytest.mark.parametrize("method", ["lizo", "lizo_orth", "lizo_no_reuse", "zo_sgd", "zo_adam"])
def test_every_method_fools_a_linear_classifier(method):
    from zohpc.reproduce.blackbox_attack import make_step

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(2, 16, generator=gen)
    clf = Linear(w.tolist())
    x = torch.rand(1, 4, 4, generator=gen) * 0.5 + 0.25
    logits = clf(x[None])[0]
    y = int(logits.argmax())
    res = attack(BlackBox(clf), x, y, 0.5, make_step(method, 0.5, 4, 5e-3, 0.5, 0), budget=400)
    assert res["success"], res


def test_no_reuse_means_no_reuse():
    """The no-reuse LIZO queries every row afresh: 1 + n queries per step; with reuse fewer."""
    from zohpc.reproduce.blackbox_attack import make_step

    counts = {}
    for method, bound in (("lizo", None), ("lizo_no_reuse", None), ("lizo", 0.0)):
        w = torch.zeros(8, requires_grad=True)
        step = make_step(method, 0.1, 4, 5e-3, 0.5, 0, reuse_bound=bound)([w])
        calls = [0]

        def closure():
            calls[0] += 1
            return float(((w - 1) ** 2).sum())

        for _ in range(10):
            step(closure)
        counts[method, bound] = calls[0]
    assert counts["lizo_no_reuse", None] == 10 * 5 == counts["lizo", 0.0]  # bound 0: nothing is reusable
    assert counts["lizo", None] < counts["lizo_no_reuse", None]


def test_margin_gradient_is_the_closed_form_on_a_linear_classifier():
    from zohpc.reproduce.blackbox_attack import margin_gradient

    w_cls = torch.tensor([[1.0, -2.0, 0.5, 0.0], [0.0, 1.0, -1.0, 2.0]])
    x = torch.tensor([[[0.5, 0.4], [0.6, 0.3]]])  # x + eps tanh(w) stays inside [0, 1]: no clamp
    eps, w = 0.1, torch.tensor([[[0.3, -0.2], [0.1, 0.7]]])
    g = margin_gradient(Linear(w_cls.tolist()), x, 0, eps)(w)
    # margin = (W_0 - W_1) . (x + eps tanh w) away from the clamp: d/dw = eps sech^2(w) (W_0 - W_1)
    expect = eps * (1 - torch.tanh(w) ** 2) * (w_cls[0] - w_cls[1]).view(1, 2, 2)
    assert torch.allclose(g, expect, atol=1e-6)


def test_probe_watches_without_changing_the_attack():
    """Same outcome with and without the probe; its counts are the optimizer's."""
    from zohpc.reproduce.blackbox_attack import DIAG, StepProbe, make_step, margin_gradient

    gen = torch.Generator().manual_seed(1)
    clf = Linear(torch.randn(3, 16, generator=gen).tolist())
    x = torch.rand(1, 4, 4, generator=gen) * 0.5 + 0.25
    y = int(clf(x[None])[0].argmax())
    for method in ("lizo", "lizo_no_reuse", "zo_sgd"):
        plain = attack(BlackBox(clf), x, y, 0.3, make_step(method, 0.5, 4, 5e-3, 0.5, 0), budget=60)
        probe = StepProbe(margin_gradient(clf, x, y, 0.3))
        watched = attack(BlackBox(clf), x, y, 0.3, make_step(method, 0.5, 4, 5e-3, 0.5, 0, probe), budget=60)
        assert watched == plain
        t = dict(zip(DIAG, probe.row()))
        assert t["steps"] >= 3 and t["sample_rows"] == 4 * t["steps"]
        # queries of completed steps only: the step the attack's end cut short is not one
        assert t["step_queries"] < watched["queries"]
        if method != "lizo":  # the center and 4 directions per step
            assert t["step_queries"] == 5 * t["steps"]
        assert -1 <= t["alignment"] / t["aligned_steps"] <= 1
        if method == "lizo":  # at most floor(0.5 * 4) rows reused per step, within the bound 2 lr = 1
            assert 0 < t["reused_rows"] <= 2 * t["steps"]
            assert t["bound"] == pytest.approx(1.0 * t["bounded_steps"]) and t["bounded_steps"] == t["steps"]
            assert t["reused_distance"] / t["reused_rows"] * 5e-3 <= 1.0
        else:
            assert t["reused_rows"] == 0 and t["bounded_steps"] == 0


def test_probe_alignment_is_one_along_the_true_gradient():
    from zohpc.reproduce.blackbox_attack import DIAG, StepProbe, margin_gradient

    clf = Linear([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    x = torch.tensor([[[0.5, 0.25], [0.25, 0.25]]])
    oracle = margin_gradient(clf, x, 0, 0.2)

    def steepest(params):
        w = params[0]

        def step(closure):
            closure()
            with torch.no_grad():
                w.sub_(oracle(w.detach().clone()))

        return StepProbe.wrap(probe, step, params, None, 4, 5e-3)

    probe = StepProbe(oracle)
    res = attack(BlackBox(clf), x, 0, 0.2, steepest, budget=50)
    t = dict(zip(DIAG, probe.row()))
    assert res["success"] and t["steps"] >= 1
    assert t["alignment"] / t["aligned_steps"] == pytest.approx(1.0)


def test_goal_counts_budgets_ahead_beyond_one_standard_error():
    from zohpc.reproduce.blackbox_attack import METHODS, ahead, goal_check

    n = 200
    rng = np.random.default_rng(0)

    def outcomes(p_success, queries):
        out = np.zeros((n, 3))
        out[:, 0] = rng.random(n) < p_success
        out[:, 1] = queries + rng.integers(-5, 6, n)
        return out

    strong, weak = outcomes(0.9, 40), outcomes(0.5, 40)
    assert ahead(strong, weak, 150) == "success" and ahead(weak, strong, 150) is None
    fast = weak.copy()
    fast[:, 1] -= 20  # the same successes, 20 queries sooner
    assert ahead(fast, weak, 150) == "queries" and ahead(weak, weak, 150) is None
    assert ahead(fast, weak, 10) is None  # no success within 10 queries: no verdict
    nearly = weak.copy()
    nearly[:, 1] -= 0.1  # fewer queries, but by less than the standard error of the difference
    assert ahead(nearly, weak, 150) is None
    mixed = weak.copy()  # three images won and two lost: one more success, within the error
    won, lost = np.flatnonzero(weak[:, 0] == 0)[:3], np.flatnonzero(weak[:, 0] == 1)[:2]
    mixed[won, 0], mixed[lost, 0] = 1, 0
    assert ahead(mixed, weak, 150) is None and ahead(weak, mixed, 150) is None
    out = {m: weak for m in METHODS}
    out["lizo"] = strong
    verdict = goal_check(out, [10, 50, 150])
    assert verdict["lizo"] == {"budgets_ahead": [50, 150], "met": True} and verdict["met"]
    assert not goal_check({m: weak for m in METHODS}, [50, 150])["met"]
    out["zo_sgd"] = strong  # one non-reusing method as good as LIZO: not ahead of every one
    assert goal_check(out, [10, 50, 150])["lizo"]["budgets_ahead"] == []


def test_study_quick_two_ranks(tmp_path):
    proc = run_ranks(2, ["-m", "zohpc.reproduce", "blackbox_attack", "--quick", "--json", "--out", str(tmp_path)],
                     timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result["methods"]) >= {"lizo", "lizo_no_reuse", "zo_sgd", "zo_adam"}
    for m, r in result["methods"].items():
        assert 0.0 <= r["success_rate"] <= 1.0
        assert r["mean_queries"] is None or 1 <= r["mean_queries"] <= result["budget"]
    # the images are ones the classifier gets right: without an attack the success rate is 0
    assert result["methods"]["lizo"]["success_rate"] > 0
    diag = {m: r["diagnostics"] for m, r in result["methods"].items()}
    assert 0 < diag["lizo"]["reuse_rate"] <= 0.5 and 0 < diag["lizo_orth"]["reuse_rate"] <= 0.5
    assert diag["lizo_no_reuse"]["reuse_rate"] == 0 and diag["lizo_no_reuse"]["step_over_bound"] is None
    assert diag["lizo"]["step_over_bound"] > 0 and diag["lizo"]["reused_distance_mu"] > 0
    assert all(-1 <= d["alignment"] <= 1 for d in diag.values())
    assert all("alignment" in e for e in result["tuning"]["lizo"])
    sweep = {e["bound_over_lr"]: e for e in result["bound_sweep"]}  # a tighter bound: less reuse
    assert sweep[0.1]["reuse_rate"] < sweep[2.0]["reuse_rate"]
    assert isinstance(result["goal"]["met"], bool) and result["goal"]["budgets"] == [50, 100, 150]
    for name in ("blackbox_attack.json", "blackbox_attack.txt", "blackbox_attack.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "blackbox_attack.json").read_text())["methods"] == result["methods"]


def test_attack_task_trains_with_the_cli_and_lizo(tmp_path):
    out = tmp_path / "run"
    proc = run_ranks(1, ["-m", "zohpc.train", "--set", "task.name=zohpc.tasks.attack:build", "--set", "optim.name=lizo",
                         "--set", "optim.lr=5", "--set", "task.epsilon=0.15",
                         "--set", "prune.method=none", "--set", "train.epochs=30", "--out", str(out)], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert done["event"] == "done" and done["final"]["success"] == 1.0 and done["final"]["margin"] < 0
