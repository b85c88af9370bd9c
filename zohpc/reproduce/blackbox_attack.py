"""ReLIZO's black-box adversarial attack, in miniature: LIZO with query reuse (Gaussian or
orthogonal directions) against ZO-SGD, ZO-Adam and LIZO without reuse, on the digits
classifier seen only through its logits.

Each correctly classified digits test image is attacked on its own (untargeted,
L-infinity budget ``epsilon`` in ``[0, 1]`` pixels, the margin loss of
:mod:`zohpc.tasks.attack`) with at most ``budget`` queries; an attack succeeds at the first
query the classifier gets wrong. Every method takes ``samples`` directions per step and the
same budget. Each method's learning rate is chosen from one common grid on the first 40
of these images (highest success rate, then fewest queries); all the others are then
attacked once with it.
Since an attack with a smaller budget is the same attack cut short, one run at the largest
budget gives the success rate at every budget (the figure's curves).

Why reuse does or does not pay is measured on every step (:class:`StepProbe`): how many of
the ``samples`` rows were reused, the step length against the reuse bound, how far (in
finite-difference steps) the reused points lie, and the step's alignment with the true
descent direction, which the study (not the attack) reads from the white-box classifier.

Images are split over the ranks in contiguous blocks; results are all-gathered.
"""

from __future__ import annotations

import numpy as np
import torch

from ..seeding import derive_seed
from ..plotting import figure

PAPER = {
    "source": "ReLIZO (Wang et al., NeurIPS 2024): black-box adversarial attacks",
    "claim": "reusing earlier queries cuts the queries an attack needs at the same sample size "
             "(no figures compared: the seed states no attack setting, only ReLIZO's defaults "
             "b = 8, bound 2 lr, max reuse rate 0.5, Gaussian directions, which are used here)",
}

METHODS = ("lizo", "lizo_orth", "lizo_no_reuse", "zo_sgd", "zo_adam")
REUSING = ("lizo", "lizo_orth")  # the methods the goal is about
LABELS = {"lizo": "LIZO (reuse)", "lizo_orth": "LIZO (reuse, orth.)", "lizo_no_reuse": "LIZO (no reuse)",
          "zo_sgd": "ZO-SGD", "zo_adam": "ZO-Adam"}
# per-attack sums of StepProbe (the columns after (success, queries) in attack_all's array)
DIAG = ("steps", "step_queries", "sample_rows", "reused_rows", "fallbacks", "step_length", "bound",
        "bounded_steps", "step_over_bound", "aligned_steps", "alignment", "reused_distance")

SETTINGS = {
    False: dict(images=0, tune_images=40, budget=150, curve_budget=500, lrs=(0.2, 0.5, 1.0, 2.0, 5.0, 10.0),
                goal_budgets=(50, 100, 150, 200, 300, 500), bound_factors=(0.1, 0.3, 1.0, 2.0)),
    True: dict(images=16, tune_images=8, budget=150, curve_budget=150, lrs=(1.0, 5.0), goal_budgets=(50, 100, 150),
               bound_factors=(0.1, 2.0)),
}
# epsilon 0.15: the white-box attack (backprop through the classifier) fools nearly every
# image, so what separates the black-box methods is query efficiency, not feasibility
COMMON = dict(epsilon=0.15, samples=8, mu=5e-3, max_reuse_rate=0.5, classifier_epochs=30, seed=0,
              white_box_steps=100)


def make_step(method: str, lr: float, samples: int, mu: float, max_reuse_rate: float, seed: int, probe=None,
              reuse_bound: float | None = None):
    """``params -> step(closure)`` for one method (public optimizer APIs only).

    ``probe``: a :class:`StepProbe` that watches every step (it changes nothing).
    ``reuse_bound``: the reusing LIZO's bound (default ReLIZO's 2 lr)."""
    from ..optim import LIZO, RGE, ZOSGD

    def optimizer(params):
        """``(step, the LIZO instance or None)``."""
        if method in ("lizo", "lizo_orth"):  # ReLIZO's reuse bound 2 lr
            opt = LIZO(params, lr, num_sample_per_step=samples, reuse_distance_bound=reuse_bound,
                       max_reuse_rate=max_reuse_rate, sample_norm=mu, orthogonal_sample=method == "lizo_orth", seed=seed)
            return opt.step, opt
        if method == "lizo_no_reuse":  # bound 0 (the reference's "no reuse"), and no row may be reused
            opt = LIZO(params, lr, num_sample_per_step=samples, reuse_distance_bound=0.0, max_reuse_rate=0.0,
                       sample_norm=mu, seed=seed)
            return opt.step, opt
        if method == "zo_sgd":
            return ZOSGD(params, lr, q=samples, mu=mu, seed=seed).step, None
        if method == "zo_adam":
            est = RGE(params, q=samples, mu=mu, seed=seed)
            adam = torch.optim.Adam(params, lr=lr)

            def step(closure):
                est.estimate(closure)
                adam.step()

            return step, None
        raise ValueError(f"unknown method {method!r}")

    def build(params):
        step, lizo = optimizer(params)
        return step if probe is None else probe.wrap(step, params, lizo, samples, mu)

    return build


class StepProbe:
    """Per-step diagnostics of one attack, summed over its completed steps (see ``DIAG``).

    ``true_grad(w)`` is the margin's gradient at the perturbation parameters ``w`` (the
    study computes it through the white-box classifier; it is no query). Recorded per step:
    the queries it made, the rows reused out of the ``samples`` (LIZO), re-queried fallbacks,
    the step length ``|s|`` and the reuse bound it had (``|s| / bound``), the distance of the reused points
    from the iterate in units of the finite-difference step ``mu``, and the alignment
    ``cos(-s, true gradient)`` (1: steepest descent; a random direction: about 0).
    A step cut short by the end of the attack is not recorded.
    """

    def __init__(self, true_grad):
        self.true_grad = true_grad
        self.sums = dict.fromkeys(DIAG, 0.0)

    def wrap(self, step, params, lizo, samples: int, mu: float):
        w = params[0]

        def probed(closure):
            x0 = w.detach().flatten().double().clone()
            g = self.true_grad(w.detach().clone()).flatten().double()
            bound = lizo.distance_bound() if lizo is not None else 0.0
            calls = [0]

            def counted():
                calls[0] += 1
                return closure()

            step(counted)
            s = w.detach().flatten().double() - x0
            add = self.sums
            add["steps"] += 1
            add["step_queries"] += calls[0]
            add["sample_rows"] += samples
            length = float(s.norm())
            add["step_length"] += length
            if lizo is not None:
                stats = lizo.last_step_stats
                r = int(stats["reused"])
                add["reused_rows"] += r
                add["fallbacks"] += int(stats["fallback"])
                if r and lizo.last_offsets is not None:
                    add["reused_distance"] += float(lizo.last_offsets[:r].norm(dim=1).sum()) / mu
            if bound > 0:
                add["bound"] += bound
                add["bounded_steps"] += 1
                add["step_over_bound"] += length / bound
            gn = float(g.norm())
            if length > 0 and gn > 0:
                add["aligned_steps"] += 1
                add["alignment"] += float(-(s @ g)) / (length * gn)

        return probed

    def row(self) -> list[float]:
        return [self.sums[k] for k in DIAG]


def margin_gradient(clf, x, y: int, epsilon: float):
    """``w -> d margin / d w`` of the perturbation ``epsilon tanh(w)`` of ``x``, by backprop (the oracle)."""
    from ..tasks.attack import Perturbation

    def grad(w):
        pert = Perturbation(x.shape, epsilon)
        with torch.no_grad():
            pert.w.copy_(w.view_as(pert.w))
        with torch.enable_grad():
            z = clf(pert(x[None]))[0]
            margin = z[y] - torch.cat([z[:y], z[y + 1:]]).max()
            (g,) = torch.autograd.grad(margin, pert.w)
        return g

    return grad


def attack_all(comm, blackbox, xs, ys, indices, jobs, cfg, oracle=None) -> np.ndarray:
    """Run every ``(method, lr, budget[, reuse bound])`` job on every image; ``(jobs, images, 2 + len(DIAG))``
    array of (success, queries, the :class:`StepProbe` sums; zeros without ``oracle``).

    ``oracle``: the white-box classifier, for the probe's true gradients (never queried by
    the attack). Images are split over the ranks; every rank returns the full array.
    """
    from ..tasks.attack import attack

    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    m = len(indices)
    counts = [m // size + (1 if r < m % size else 0) for r in range(size)]
    start = sum(counts[:rank])
    width = 2 + len(DIAG)
    local = torch.zeros(counts[rank], len(jobs), width, dtype=torch.float64)
    for j in range(counts[rank]):
        i = start + j
        seed = derive_seed("attack-directions", cfg["seed"], int(indices[i])) % (2 ** 31)
        for k, (method, lr, budget, *bound) in enumerate(jobs):
            probe = None if oracle is None else StepProbe(margin_gradient(oracle, xs[i], int(ys[i]), cfg["epsilon"]))
            step = make_step(method, lr, cfg["samples"], cfg["mu"], cfg["max_reuse_rate"], seed, probe, *bound)
            res = attack(blackbox, xs[i], int(ys[i]), cfg["epsilon"], step, budget)
            local[j, k, 0], local[j, k, 1] = float(res["success"]), float(res["queries"])
            if probe is not None:
                local[j, k, 2:] = torch.tensor(probe.row(), dtype=torch.float64)
    flat = local.reshape(-1).contiguous()
    if size > 1:
        flat = comm.allgatherv(flat, [c * len(jobs) * width for c in counts])
    return flat.view(m, len(jobs), width).permute(1, 0, 2).numpy()


def summarize(outcomes: np.ndarray, budget: int) -> dict:
    """Success rate within ``budget`` queries and mean queries of the successful attacks (None: none)."""
    success, queries = outcomes[:, 0] > 0, outcomes[:, 1]
    won = success & (queries <= budget)
    return {"success_rate": float(won.mean()) if len(won) else 0.0,
            "mean_queries": float(queries[won].mean()) if won.any() else None}


def diagnose(outcomes: np.ndarray) -> dict:
    """Means of the :class:`StepProbe` sums over all completed steps of all images.

    ``reuse_rate``: reused rows / sample rows (the mean per-step fraction of the ``samples``
    rows taken from history); ``step_over_bound``: mean ``|s| / bound`` (None: no reuse
    bound); ``reused_distance_mu``: mean distance of a reused point from the iterate, in
    finite-difference steps ``mu``; ``alignment``: mean ``cos(-s, true gradient)``.
    """
    t = dict(zip(DIAG, outcomes[:, 2:].sum(axis=0).tolist()))

    def ratio(a, b):
        return float(a / b) if b > 0 else None

    return {"steps_per_image": ratio(t["steps"], outcomes.shape[0]),
            "queries_per_step": ratio(t["step_queries"], t["steps"]),
            "reuse_rate": ratio(t["reused_rows"], t["sample_rows"]),
            "reused_per_step": ratio(t["reused_rows"], t["steps"]),
            "fallback_rate": ratio(t["fallbacks"], t["steps"]),
            "step_length": ratio(t["step_length"], t["steps"]),
            "bound": ratio(t["bound"], t["bounded_steps"]),
            "step_over_bound": ratio(t["step_over_bound"], t["bounded_steps"]),
            "reused_distance_mu": ratio(t["reused_distance"], t["reused_rows"]),
            "alignment": ratio(t["alignment"], t["aligned_steps"])}


def ahead(a: np.ndarray, b: np.ndarray, budget: int) -> str | None:
    """How ``a`` beats ``b`` at ``budget`` beyond one standard error, or None.

    "success": a higher success rate by more than the standard error of the paired
    per-image difference (the same images); "queries": success rates within that error
    and fewer mean queries of the successful attacks by more than the difference's standard
    error (unpaired: each mean is over its own successes).
    """
    wa = (a[:, 0] > 0) & (a[:, 1] <= budget)
    wb = (b[:, 0] > 0) & (b[:, 1] <= budget)
    d = wa.astype(float) - wb.astype(float)
    n = len(d)
    se = float(d.std(ddof=1) / np.sqrt(n)) if n > 1 else np.inf
    if d.mean() > se:
        return "success"
    if abs(d.mean()) > se or wa.sum() < 2 or wb.sum() < 2:
        return None
    qa, qb = a[wa, 1], b[wb, 1]
    se_q = float(np.sqrt(qa.var(ddof=1) / len(qa) + qb.var(ddof=1) / len(qb)))
    return "queries" if qb.mean() - qa.mean() > se_q else None


def goal_check(out: dict, budgets: list[int]) -> dict:
    """Per reusing LIZO variant: the budgets where it is ahead of every non-reusing method."""
    others = [m for m in METHODS if m not in REUSING]
    verdict = {}
    for m in REUSING:
        wins = [b for b in budgets if all(ahead(out[m], out[o], b) for o in others)]
        verdict[m] = {"budgets_ahead": wins, "met": len(wins) >= 2}
    verdict["met"] = any(verdict[m]["met"] for m in REUSING)
    return verdict


def better(a: dict, b: dict | None) -> bool:
    """Higher success rate, then fewer mean queries."""
    if b is None:
        return True
    if a["success_rate"] != b["success_rate"]:
        return a["success_rate"] > b["success_rate"]
    return _q(a) < _q(b)


def _q(summary: dict) -> float:
    return np.inf if summary["mean_queries"] is None else summary["mean_queries"]


def white_box_success(clf, xs, ys, epsilon: float, steps: int, lr: float = 0.1) -> float:
    """Success rate of the same attack with gradients (Adam through a white-box copy): the ceiling."""
    from ..tasks.attack import Perturbation

    won = 0
    for x, y in zip(xs, ys):
        pert = Perturbation(x.shape, epsilon)
        opt = torch.optim.Adam(pert.parameters(), lr=lr)
        for _ in range(steps):
            z = clf(pert(x[None]))[0]
            margin = z[y] - torch.cat([z[:y], z[y + 1:]]).max()
            if float(margin.detach()) < 0:
                won += 1
                break
            opt.zero_grad()
            margin.backward()
            opt.step()
    return won / max(1, len(xs))


def run(comm, out_dir: str, quick: bool) -> dict:
    from ..config import Config
    from ..tasks.blackbox import BlackBox, accuracy, load_pixels, train_classifier

    s, cfg = SETTINGS[bool(quick)], dict(COMMON)
    torch.set_num_threads(1)
    data = load_pixels(Config().data)
    clf = train_classifier(data, "digits_cnn", cfg["classifier_epochs"], seed=cfg["seed"], comm=comm)
    with torch.no_grad():
        correct = torch.nonzero(clf(data.test_x).argmax(1) == data.test_y).flatten()
    need = s["tune_images"] + s["images"] if s["images"] else len(correct)  # 0: all the others
    tune_idx, test_idx = correct[:s["tune_images"]], correct[s["tune_images"]:need]
    bb = BlackBox(clf)

    # ---- learning rate per method, on the tuning images
    jobs = [(m, lr, s["budget"]) for m in METHODS for lr in s["lrs"]]
    tuned = attack_all(comm, bb, data.test_x[tune_idx], data.test_y[tune_idx], tune_idx.tolist(), jobs, cfg, clf)
    chosen, tuning = {}, {m: [] for m in METHODS}
    for k, (m, lr, _) in enumerate(jobs):
        summary = summarize(tuned[k], s["budget"])
        tuning[m].append({"lr": lr, **summary, **diagnose(tuned[k])})
        if better(summary, chosen.get(m, (None, None))[1]):
            chosen[m] = (lr, summary)

    # ---- why: LIZO's reuse bound against the step length, at its chosen lr (tuning images)
    lr = chosen["lizo"][0]
    jobs = [("lizo", lr, s["budget"], c * lr) for c in s["bound_factors"]]
    swept = attack_all(comm, bb, data.test_x[tune_idx], data.test_y[tune_idx], tune_idx.tolist(), jobs, cfg, clf)
    bound_sweep = [{"bound_over_lr": c, "bound": c * lr, **summarize(swept[k], s["budget"]), **diagnose(swept[k])}
                   for k, c in enumerate(s["bound_factors"])]

    # ---- the attacks on the test images, at the largest budget (curves come from it)
    jobs = [(m, chosen[m][0], s["curve_budget"]) for m in METHODS]
    out = attack_all(comm, bb, data.test_x[test_idx], data.test_y[test_idx], test_idx.tolist(), jobs, cfg, clf)
    grid = sorted({*range(10, s["curve_budget"] + 1, 10), s["budget"]})
    methods = {}
    for k, m in enumerate(METHODS):
        methods[m] = {**summarize(out[k], s["budget"]), "lr": chosen[m][0],
                      "curve": [summarize(out[k], b)["success_rate"] for b in grid],
                      "diagnostics": diagnose(out[k])}
    return {
        "methods": methods,
        "goal": {**goal_check(dict(zip(METHODS, out)), s["goal_budgets"]), "budgets": list(s["goal_budgets"])},
        "white_box_success_rate": white_box_success(clf, data.test_x[test_idx], data.test_y[test_idx].tolist(),
                                                    cfg["epsilon"], cfg["white_box_steps"]),
        "budget": s["budget"],
        "curve_budgets": grid,
        "epsilon": cfg["epsilon"],
        "samples_per_step": cfg["samples"],
        "images": int(len(test_idx)),
        "tune_images": int(len(tune_idx)),
        "classifier_accuracy": accuracy(clf, data.test_x, data.test_y),
        "tuning": tuning,
        "bound_sweep": bound_sweep,
    }


def _fmt_q(q) -> str:
    return "-" if q is None else f"{q:.1f}"  # None: no successful attack


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"blackbox_attack: {result['images']} digits test images, L-inf budget {result['epsilon']} "
        f"([0, 1] pixels), {b} queries, {result['samples_per_step']} directions per step "
        f"(classifier: {100 * result['classifier_accuracy']:.1f}% clean test accuracy)",
        f"{'method':20s} {'lr':>6s} {'success':>8s} {'(+- s.e.)':>9s} {'mean queries':>13s} {'reuse':>6s} "
        f"{'|s|/bound':>9s} {'reused at':>10s} {'align':>6s} {'q/step':>6s}",
    ]
    wb = f"{100 * result['white_box_success_rate']:7.1f}%"
    lines.append(f"{'white box (FO)':20s} {'':6s} {wb} {'':9s} {'(ceiling)':>13s}")
    for m in METHODS:
        r = result["methods"][m]
        dg = r.get("diagnostics", {})
        se = 100 * (r["success_rate"] * (1 - r["success_rate"]) / max(1, result["images"])) ** 0.5
        lines.append(f"{LABELS[m]:20s} {r['lr']:6.2f} {100 * r['success_rate']:7.1f}% {se:9.1f} "
                     f"{_fmt_q(r['mean_queries']):>13s} {_fmt(dg.get('reuse_rate'), '6.3f'):>6s} "
                     f"{_fmt(dg.get('step_over_bound'), '9.3f'):>9s} "
                     f"{_fmt(dg.get('reused_distance_mu'), '8.0f') + ' mu':>10s} {_fmt(dg.get('alignment'), '6.3f'):>6s} "
                     f"{_fmt(dg.get('queries_per_step'), '6.2f'):>6s}")
    lines.append("reuse: mean fraction of the rows of a step taken from history; |s|/bound: step length over "
                 "the reuse bound 2 lr; reused at: distance of a reused point from the iterate; align: mean "
                 "cos(step, true descent direction), from the white-box classifier (no query)")
    lines.append(f"tuning ({result['tune_images']} images, {b} queries): success % / align / reuse per lr")
    lines.append(f"{'lr':>6s} " + " ".join(f"{LABELS[m]:>22s}" for m in METHODS))
    for k, lr in enumerate(e["lr"] for e in result["tuning"][METHODS[0]]):
        cells = []
        for m in METHODS:
            e = result["tuning"][m][k]
            cells.append(f"{100 * e['success_rate']:5.1f} / {_fmt(e.get('alignment'), '.3f')} / "
                         f"{_fmt(e.get('reuse_rate'), '.2f')}")
        lines.append(f"{lr:6.2f} " + " ".join(f"{c:>22s}" for c in cells))
    if result.get("bound_sweep"):
        lines.append(f"LIZO (reuse) at lr {result['methods']['lizo']['lr']:g} with other reuse bounds "
                     f"({result['tune_images']} tuning images):")
        lines.append(f"{'bound':>8s} {'success':>8s} {'reuse':>6s} {'|s|/bound':>9s} {'align':>6s} {'q/step':>6s}")
        for e in result["bound_sweep"]:
            lines.append(f"{e['bound']:8.2f} {100 * e['success_rate']:7.1f}% {_fmt(e['reuse_rate'], '6.3f')} "
                         f"{_fmt(e['step_over_bound'], '9.3f')} {_fmt(e['alignment'], '6.3f')} "
                         f"{_fmt(e['queries_per_step'], '6.2f')}")
    goal = result.get("goal", {})
    lines.append(f"paper ({PAPER['source']}): {PAPER['claim']}")
    for m in REUSING:
        if m in goal:
            lines.append(f"{LABELS[m]} ahead of every non-reusing method beyond one s.e. at budgets: "
                         f"{goal[m]['budgets_ahead'] or 'none'} (of {goal['budgets']})")
    lines.append("goal (LIZO with reuse: highest success rate, or the same rate with fewer queries, beyond the "
                 "standard error at >= 2 budgets): " + ("met" if goal.get("met") else "not met"))
    lines.append("mean queries: over the successful attacks; lr: chosen per method on "
                 f"{result['tune_images']} separate tuning images")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    with figure(path, 2, (11, 4)) as (fig, (ax, ax2)):
        for m in METHODS:
            ax.plot(result["curve_budgets"], [100 * v for v in result["methods"][m]["curve"]], label=LABELS[m])
        ax.axvline(result["budget"], color="0.6", lw=0.8, ls="--")
        ax.axhline(100 * result["white_box_success_rate"], color="0.3", lw=0.8, ls=":", label="white box (ceiling)")
        ax.set_xlabel("query budget per image")
        ax.set_ylabel("attack success rate (%)")
        ax.set_title(f"black-box attack on digits, L-inf {result['epsilon']}")
        ax.legend(fontsize=8)
        for m in METHODS:  # why: the step's alignment with the true descent direction against its length
            rows = sorted((e for e in result["tuning"][m] if e.get("alignment") is not None),
                          key=lambda e: e["step_length"])
            ax2.plot([e["step_length"] for e in rows], [e["alignment"] for e in rows], marker="o", label=LABELS[m])
        ax2.set_xscale("log")
        ax2.set_xlabel("mean step length |s| in w (tuning images, one point per lr)")
        ax2.set_ylabel("mean cos(step, true descent direction)")
        ax2.set_title("step alignment (white-box gradient, not a query)")
        ax2.legend(fontsize=8)
        fig.tight_layout()
