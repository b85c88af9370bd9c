"""``python -m zohpc.bench lizo [--quick] [--json]``

Compares LIZO with query reuse (ReLIZO), LIZO without reuse (``max_reuse_rate = 0``) and
RGE-based ZO-SGD at equal query budgets, on test functions (sphere, Rosenbrock, least
squares; d = 100 and 1,000) and on a small network (digits_cnn on a few hundred sklearn
digits, full-batch cross-entropy). For every method it reports the queries needed to reach
a target loss (None when the budget runs out first), the loss at the budget, the reuse
rate, the query savings of reuse, and the optimizer's own time per step (step time minus
time in the closure). Each method gets the best of a small learning-rate grid (by final
loss); the chosen rate is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from ..optim import LIZO, ZOSGD

N_SAMPLE = 8  # LIZO rows per step and ZO-SGD directions per step (equal sampling effort)
METHODS = ("lizo_reuse", "lizo_noreuse", "zosgd")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench lizo", description=__doc__.split("\n\n")[1])
    p.add_argument("--quick", action="store_true", help="d = 100 only, smaller budgets, one learning rate")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    return p


# ---------------------------------------------------------------------- problems
def _test_functions(d: int):
    """(name, f, x0, f_star, target fraction of the initial gap per d, base lr per method)."""
    g = torch.Generator().manual_seed(1000 + d)
    a = torch.randn(2 * d, d, dtype=torch.float64, generator=g) / math.sqrt(2 * d)
    b = torch.randn(2 * d, dtype=torch.float64, generator=g)
    x_ls = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    f_ls = float(0.5 * ((a @ x_ls - b) ** 2).sum())
    sgd_scale = N_SAMPLE / d  # dim-scaled RGE: stable steps shrink like q / d
    return [
        ("sphere", lambda x: (x * x).sum(), torch.randn(d, dtype=torch.float64, generator=g) / math.sqrt(d),
         0.0, {100: 1e-2, 1000: 0.1}, {"lizo": 0.1, "zosgd": 0.25 * sgd_scale}),
        ("rosenbrock", lambda x: (100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum(),
         torch.zeros(d, dtype=torch.float64), 0.0, {100: 0.99, 1000: 0.995}, {"lizo": 1e-3, "zosgd": 2.5e-3 * sgd_scale}),
        ("least_squares", lambda x: 0.5 * ((a @ x - b) ** 2).sum(), torch.zeros(d, dtype=torch.float64),
         f_ls, {100: 0.05, 1000: 0.2}, {"lizo": 0.5, "zosgd": 0.25 * sgd_scale}),
    ]


def _digits_problem(n_images: int):
    """digits_cnn on the first ``n_images`` sklearn digits: a deterministic full-batch loss."""
    from sklearn.datasets import load_digits

    from ..models import build_model

    data = load_digits()
    images = torch.tensor(data.images[:n_images], dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(data.target[:n_images], dtype=torch.long)
    torch.manual_seed(0)
    model = build_model("digits_cnn", (1, 8, 8), 10)
    model.train()  # batch statistics, as zohpc's loss queries use
    init = {k: v.clone() for k, v in model.state_dict().items()}
    loss_fn = torch.nn.CrossEntropyLoss()

    def fresh_model():
        model.load_state_dict(init)
        return model

    def loss(m):
        return loss_fn(m(images), labels)

    return fresh_model, loss


# ---------------------------------------------------------------------- one run
def _make(method: str, params, lr: float, sample_norm: float):
    if method == "zosgd":
        return ZOSGD(params, lr=lr, q=N_SAMPLE, mu=sample_norm, seed=0)
    return LIZO(params, lr=lr, num_sample_per_step=N_SAMPLE, max_reuse_rate=0.5 if method == "lizo_reuse" else 0.0,
                sample_norm=sample_norm, seed=0)


def _run(method, params, loss_now, lr, sample_norm, budget, target):
    """Step until the budget is spent; queries are counted in the closure."""
    opt = _make(method, params, lr, sample_norm)
    calls = [0]

    def closure():
        calls[0] += 1
        return loss_now()

    reached = None
    steps = 0
    step_seconds = 0.0
    while calls[0] < budget:
        before = calls[0]
        t0 = time.perf_counter()
        f = opt.step(closure)
        step_seconds += time.perf_counter() - t0
        steps += 1
        if reached is None and f <= target:
            reached = before + 1  # f(x) at this iterate was the step's first query
        if not math.isfinite(f):
            break
    with torch.no_grad():
        final = float(loss_now())
    if reached is None and final <= target:
        reached = calls[0]
    out = {
        "lr": lr,
        "queries": calls[0],
        "steps": steps,
        "queries_to_target": reached,
        "final_loss": final,
        "queries_per_step": calls[0] / max(steps, 1),
        "overhead_us_per_step": 1e6 * (step_seconds - opt.closure_seconds) / max(steps, 1),
    }
    if isinstance(opt, LIZO):
        out["reuse_rate"] = opt.reuse_rate
        out["fallbacks"] = opt.counters()["fallbacks"]
    return out


def _best(results):
    finite = [r for r in results if math.isfinite(r["final_loss"])]
    return min(finite, key=lambda r: r["final_loss"]) if finite else results[0]


def _compare(entry):
    """Query savings of reuse: to the target, and per step."""
    m = entry["methods"]
    q_re, q_no = m["lizo_reuse"]["queries_to_target"], m["lizo_noreuse"]["queries_to_target"]
    entry["reuse_savings_to_target"] = None if (q_re is None or q_no is None) else 1.0 - q_re / q_no
    entry["reuse_savings_per_step"] = 1.0 - m["lizo_reuse"]["queries_per_step"] / m["lizo_noreuse"]["queries_per_step"]
    q_sgd = m["zosgd"]["queries_to_target"]
    entry["lizo_vs_zosgd_queries"] = None if (q_re is None or q_sgd is None) else q_re / q_sgd
    return entry


def run(comm, args) -> int:
    torch.set_num_threads(max(1, args.threads))
    t_start = time.perf_counter()
    grid = (1.0,) if args.quick else (0.3, 1.0, 3.0)
    dims = (100,) if args.quick else (100, 1000)
    budget_of = {100: 1000 if args.quick else 2000, 1000: 4000}
    problems = []
    for d in dims:
        for name, fn, x0, f_star, frac, base in _test_functions(d):
            f0 = float(fn(x0))
            target = f_star + frac[d] * (f0 - f_star)
            entry = {"problem": name, "dim": d, "budget": budget_of[d], "initial_loss": f0, "optimal_loss": f_star,
                     "target_loss": target, "methods": {}}
            for method in METHODS:
                runs = []
                for scale in grid:
                    x = torch.nn.Parameter(x0.clone())
                    lr = base["zosgd" if method == "zosgd" else "lizo"] * scale
                    runs.append(_run(method, [x], lambda x=x: fn(x), lr, 1e-4, budget_of[d], target))
                entry["methods"][method] = _best(runs)
            problems.append(_compare(entry))
    # the network
    n_images = 200 if args.quick else 300
    fresh_model, loss = _digits_problem(n_images)
    budget = 400 if args.quick else 1500
    model = fresh_model()
    with torch.no_grad():
        f0 = float(loss(model))
    target = 0.75 * f0
    entry = {"problem": f"digits_cnn ({n_images} images, full batch)", "dim": sum(p.numel() for p in model.parameters()),
             "budget": budget, "initial_loss": f0, "optimal_loss": None, "target_loss": target, "methods": {}}
    base = {"lizo": 0.5, "zosgd": 0.005}
    for method in METHODS:
        runs = []
        for scale in grid:
            model = fresh_model()
            lr = base["zosgd" if method == "zosgd" else "lizo"] * scale
            runs.append(_run(method, list(model.parameters()), lambda m=model: loss(m), lr, 5e-3, budget, target))
        entry["methods"][method] = _best(runs)
    problems.append(_compare(entry))

    reuse_rates = [p["methods"]["lizo_reuse"]["reuse_rate"] for p in problems]
    per_step = [p["reuse_savings_per_step"] for p in problems]
    to_target = [p["reuse_savings_to_target"] for p in problems if p["reuse_savings_to_target"] is not None]
    result = {
        "bench": "lizo",
        "quick": bool(args.quick),
        "threads": torch.get_num_threads(),
        "num_sample_per_step": N_SAMPLE,
        "lr_grid_factors": list(grid),
        "problems": problems,
        "summary": {
            "mean_reuse_rate": sum(reuse_rates) / len(reuse_rates),
            "mean_reuse_savings_per_step": sum(per_step) / len(per_step),
            "mean_reuse_savings_to_target": (sum(to_target) / len(to_target)) if to_target else None,
            "targets_reached": {m: sum(p["methods"][m]["queries_to_target"] is not None for p in problems)
                                for m in METHODS},
            "lower_final_loss_count": {m: sum(min(METHODS, key=lambda k: p["methods"][k]["final_loss"]) == m
                                              for p in problems) for m in METHODS},
        },
        "seconds": time.perf_counter() - t_start,
    }
    if comm.rank == 0:
        if args.json:
            print(json.dumps(result))
        else:
            _print_table(result)
    return 0


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def _print_table(result) -> None:
    print(f"{'problem':<36}{'dim':>6}{'method':>14}{'lr':>9}{'q->target':>11}{'final':>11}{'reuse':>7}{'us/step':>9}")
    for p in result["problems"]:
        for m in METHODS:
            r = p["methods"][m]
            print(f"{p['problem']:<36}{p['dim']:>6}{m:>14}{_fmt(r['lr']):>9}{_fmt(r['queries_to_target']):>11}"
                  f"{_fmt(r['final_loss']):>11}{_fmt(r.get('reuse_rate')):>7}{r['overhead_us_per_step']:>9.0f}")
    print(json.dumps(result["summary"]))
