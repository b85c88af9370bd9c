"""ReLIZO's black-box adversarial attack, in miniature: LIZO with query reuse against ZO-SGD,
ZO-Adam and LIZO without reuse, on the digits classifier seen only through its logits.

Each correctly classified digits test image is attacked on its own (untargeted,
L-infinity budget ``epsilon`` in ``[0, 1]`` pixels, the margin loss of
:mod:`zohpc.tasks.attack`) with at most ``budget`` queries; an attack succeeds at the first
query the classifier gets wrong. Every method takes ``samples`` directions per step and the
same budget. Each method's learning rate is chosen from one common grid on the first 40
of these images (highest success rate, then fewest queries); all the others are then
attacked once with it.
Since an attack with a smaller budget is the same attack cut short, one run at the largest
budget gives the success rate at every budget (the figure's curves).

Images are split over the ranks in contiguous blocks; results are all-gathered.
"""

from __future__ import annotations

import numpy as np
import torch

from ..seeding import derive_seed

PAPER = {
    "source": "ReLIZO (Wang et al., NeurIPS 2024): black-box adversarial attacks",
    "claim": "reusing earlier queries cuts the queries an attack needs at the same sample size "
             "(no figures compared: the paper's attack setting is not reproduced here)",
}

METHODS = ("lizo", "lizo_no_reuse", "zo_sgd", "zo_adam")
LABELS = {"lizo": "LIZO (reuse)", "lizo_no_reuse": "LIZO (no reuse)", "zo_sgd": "ZO-SGD", "zo_adam": "ZO-Adam"}

SETTINGS = {
    False: dict(images=0, tune_images=40, budget=150, curve_budget=500, lrs=(0.2, 0.5, 1.0, 2.0, 5.0, 10.0)),
    True: dict(images=16, tune_images=8, budget=150, curve_budget=150, lrs=(1.0, 5.0)),
}
# epsilon 0.15: the white-box attack (backprop through the classifier) fools nearly every
# image, so what separates the black-box methods is query efficiency, not feasibility
COMMON = dict(epsilon=0.15, samples=8, mu=5e-3, max_reuse_rate=0.5, classifier_epochs=30, seed=0,
              white_box_steps=100)


def make_step(method: str, lr: float, samples: int, mu: float, max_reuse_rate: float, seed: int):
    """``params -> step(closure)`` for one method (public optimizer APIs only)."""
    from ..optim import LIZO, RGE, ZOSGD

    def build(params):
        if method == "lizo":  # ReLIZO's reuse bound 2 lr
            return LIZO(params, lr, num_sample_per_step=samples, max_reuse_rate=max_reuse_rate, sample_norm=mu,
                        seed=seed).step
        if method == "lizo_no_reuse":  # bound 0 (the reference's "no reuse"), and no row may be reused
            return LIZO(params, lr, num_sample_per_step=samples, reuse_distance_bound=0.0, max_reuse_rate=0.0,
                        sample_norm=mu, seed=seed).step
        if method == "zo_sgd":
            return ZOSGD(params, lr, q=samples, mu=mu, seed=seed).step
        if method == "zo_adam":
            est = RGE(params, q=samples, mu=mu, seed=seed)
            adam = torch.optim.Adam(params, lr=lr)

            def step(closure):
                est.estimate(closure)
                adam.step()

            return step
        raise ValueError(f"unknown method {method!r}")

    return build


def attack_all(comm, blackbox, xs, ys, indices, jobs, cfg) -> np.ndarray:
    """Run every ``(method, lr)`` job on every image; ``(jobs, images, 2)`` array of (success, queries).

    Images are split over the ranks; every rank returns the full array.
    """
    from ..tasks.attack import attack

    size = comm.size if comm is not None else 1
    rank = comm.rank if comm is not None else 0
    m = len(indices)
    counts = [m // size + (1 if r < m % size else 0) for r in range(size)]
    start = sum(counts[:rank])
    local = torch.zeros(counts[rank], len(jobs), 2, dtype=torch.float64)
    for j in range(counts[rank]):
        i = start + j
        seed = derive_seed("attack-directions", cfg["seed"], int(indices[i])) % (2 ** 31)
        for k, (method, lr, budget) in enumerate(jobs):
            step = make_step(method, lr, cfg["samples"], cfg["mu"], cfg["max_reuse_rate"], seed)
            res = attack(blackbox, xs[i], int(ys[i]), cfg["epsilon"], step, budget)
            local[j, k, 0], local[j, k, 1] = float(res["success"]), float(res["queries"])
    flat = local.reshape(-1).contiguous()
    if size > 1:
        flat = comm.allgatherv(flat, [c * len(jobs) * 2 for c in counts])
    return flat.view(m, len(jobs), 2).permute(1, 0, 2).numpy()


def summarize(outcomes: np.ndarray, budget: int) -> dict:
    """Success rate within ``budget`` queries and mean queries of the successful attacks (None: none)."""
    success, queries = outcomes[:, 0] > 0, outcomes[:, 1]
    won = success & (queries <= budget)
    return {"success_rate": float(won.mean()) if len(won) else 0.0,
            "mean_queries": float(queries[won].mean()) if won.any() else None}


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
    tuned = attack_all(comm, bb, data.test_x[tune_idx], data.test_y[tune_idx], tune_idx.tolist(), jobs, cfg)
    chosen, tuning = {}, {m: [] for m in METHODS}
    for k, (m, lr, _) in enumerate(jobs):
        summary = summarize(tuned[k], s["budget"])
        tuning[m].append({"lr": lr, **summary})
        if better(summary, chosen.get(m, (None, None))[1]):
            chosen[m] = (lr, summary)

    # ---- the attacks on the test images, at the largest budget (curves come from it)
    jobs = [(m, chosen[m][0], s["curve_budget"]) for m in METHODS]
    out = attack_all(comm, bb, data.test_x[test_idx], data.test_y[test_idx], test_idx.tolist(), jobs, cfg)
    grid = sorted({*range(10, s["curve_budget"] + 1, 10), s["budget"]})
    methods = {}
    for k, m in enumerate(METHODS):
        methods[m] = {**summarize(out[k], s["budget"]), "lr": chosen[m][0],
                      "curve": [summarize(out[k], b)["success_rate"] for b in grid]}
    return {
        "methods": methods,
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
    }


def _fmt_q(q) -> str:
    return "-" if q is None else f"{q:.1f}"  # None: no successful attack


def table(result: dict) -> str:
    b = result["budget"]
    lines = [
        f"blackbox_attack: {result['images']} digits test images, L-inf budget {result['epsilon']} "
        f"([0, 1] pixels), {b} queries, {result['samples_per_step']} directions per step "
        f"(classifier: {100 * result['classifier_accuracy']:.1f}% clean test accuracy)",
        f"{'method':18s} {'lr':>6s} {'success':>8s} {'(+- s.e.)':>9s} {'mean queries':>13s}",
    ]
    wb = f"{100 * result['white_box_success_rate']:7.1f}%"
    lines.append(f"{'white box (FO)':18s} {'':6s} {wb} {'':9s} {'(ceiling)':>13s}")
    for m in METHODS:
        r = result["methods"][m]
        se = 100 * (r["success_rate"] * (1 - r["success_rate"]) / max(1, result["images"])) ** 0.5
        lines.append(f"{LABELS[m]:18s} {r['lr']:6.2f} {100 * r['success_rate']:7.1f}% {se:9.1f} "
                     f"{_fmt_q(r['mean_queries']):>13s}")
    lizo = result["methods"]["lizo"]
    others = [result["methods"][m] for m in METHODS if m != "lizo"]
    best = max(o["success_rate"] for o in others)
    met = lizo["success_rate"] > best or (lizo["success_rate"] == best and all(
        o["success_rate"] < best or _q(o) > _q(lizo) for o in others))
    lines.append(f"paper ({PAPER['source']}): {PAPER['claim']}")
    lines.append("goal (LIZO with reuse: highest success rate, or the same rate with fewer queries): "
                 + ("met" if met else "not met"))
    lines.append("mean queries: over the successful attacks; lr: chosen per method on "
                 f"{result['tune_images']} separate tuning images")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    from ..plotting import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        ax.plot(result["curve_budgets"], [100 * v for v in result["methods"][m]["curve"]], label=LABELS[m])
    ax.axvline(result["budget"], color="0.6", lw=0.8, ls="--")
    ax.axhline(100 * result["white_box_success_rate"], color="0.3", lw=0.8, ls=":", label="white box (ceiling)")
    ax.set_xlabel("query budget per image")
    ax.set_ylabel("attack success rate (%)")
    ax.set_title(f"black-box attack on digits, L-inf {result['epsilon']}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
