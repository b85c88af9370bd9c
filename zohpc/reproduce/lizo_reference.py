"""``lizo_reference``: zohpc's LIZO on the public ReLIZO code's own test problem.

The problem and settings of the reference code: ``f(x) = 1/2 x^T A x`` in d = 50 with
``torch.manual_seed(0); A = randn(50, 50); A = A A^T / 50 + I``, ``x0 = ones``, float64,
lr 0.05, 10 samples per step, reuse bound 0.1, max reuse rate 0.5, 300 steps; the
reference's fresh offsets are Gaussian with std 1e-5 per coordinate, which is LIZO's
default ``sample_norm`` (``1e-5 sqrt(d)``). Queries count every closure evaluation: one
base query per step plus the fresh rows.

One run depends on the random directions: whether a step in the hand-over phase (steps
near the reuse bound) may reuse decides the query count to a few dozen, so the study also
reports the spread over several seeds of the direction sampler, and the same run with
reuse switched off (``reuse_distance_bound = 0``).
"""

from __future__ import annotations

import statistics

import torch

from ..optim import LIZO

from ..plotting import figure

PAPER = {
    "source": "public ReLIZO code (Thinklab-SJTU/ReLIZO), its quadratic test with its own settings",
    "quadratic50": {"f_ratio": 3.5e-9, "queries": 2080, "fresh": 1780, "base": 300},
    "goal": {"f_ratio": 3.5e-9, "queries": 2080},
}

DIM, LR, N_SAMPLE, BOUND, RATE, STEPS = 50, 0.05, 10, 0.1, 0.5, 300


def quadratic() -> torch.Tensor:
    """The reference's matrix ``A`` (float64); the generator state of torch is restored."""
    state = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        a = torch.randn(DIM, DIM, dtype=torch.float64)
    finally:
        torch.set_rng_state(state)
    return a @ a.T / DIM + torch.eye(DIM, dtype=torch.float64)


def solve(a: torch.Tensor, seed: int = 0, reuse: bool = True, trace: bool = False) -> dict:
    """300 LIZO steps from ``x0 = ones``; ``f_ratio = f(x_300) / f(x0)``."""
    x = torch.nn.Parameter(torch.ones(DIM, dtype=torch.float64))

    def f():
        return 0.5 * x.detach() @ a @ x.detach()

    f0 = float(f())
    opt = LIZO([x], lr=LR, num_sample_per_step=N_SAMPLE, reuse_distance_bound=BOUND if reuse else 0.0,
               max_reuse_rate=RATE, seed=seed)
    curve = []
    for _ in range(STEPS):
        opt.step(f)
        if trace:
            curve.append([opt.num_queries, float(f()) / f0])
    c = opt.counters()
    out = {"f_ratio": float(f()) / f0, "queries": c["queries"], "fresh": c["fresh"], "base": c["steps"],
           "reused": c["reused"], "reuse_rate": opt.reuse_rate, "fallbacks": c["fallbacks"],
           "sample_norm": opt.sample_norm}
    if trace:
        out["curve"] = curve
    return out


def _meets(r: dict) -> bool:
    return r["f_ratio"] <= PAPER["goal"]["f_ratio"] and r["queries"] <= PAPER["goal"]["queries"]


def run(comm, out_dir: str, quick: bool) -> dict:
    """Cheap (about a second per run on one core): every rank computes it, rank 0 reports."""
    torch.set_num_threads(1)
    a = quadratic()
    main = solve(a, seed=0, trace=True)
    no_reuse = solve(a, seed=0, reuse=False, trace=True)
    seeds = list(range(5 if quick else 20))
    spread = [solve(a, seed=s) for s in seeds]
    ratios = [r["f_ratio"] for r in spread]
    queries = [r["queries"] for r in spread]
    return {
        "quadratic50": main,
        "no_reuse": no_reuse,
        "seeds": {
            "seeds": seeds,
            "f_ratio_median": statistics.median(ratios),
            "f_ratio_max": max(ratios),
            "queries_median": statistics.median(queries),
            "queries_min": min(queries),
            "queries_max": max(queries),
            "goal_met": sum(_meets(r) for r in spread),
        },
        "goal": {**PAPER["goal"], "met": _meets(main)},
    }


def table(result: dict) -> str:
    q, ref, nr, sp = result["quadratic50"], PAPER["quadratic50"], result["no_reuse"], result["seeds"]
    rows = [
        ("", "f/f0", "queries", "fresh", "base", "reuse rate"),
        ("ReLIZO reference", f"{ref['f_ratio']:.2g}", f"{ref['queries']:,}", f"{ref['fresh']:,}", f"{ref['base']}",
         f"{1 - ref['fresh'] / (N_SAMPLE * STEPS):.3f}"),
        ("zohpc LIZO (seed 0)", f"{q['f_ratio']:.2g}", f"{q['queries']:,}", f"{q['fresh']:,}", f"{q['base']}",
         f"{q['reuse_rate']:.3f}"),
        ("zohpc LIZO, no reuse", f"{nr['f_ratio']:.2g}", f"{nr['queries']:,}", f"{nr['fresh']:,}", f"{nr['base']}",
         f"{nr['reuse_rate']:.3f}"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["lizo_reference: f = 1/2 x^T A x, d = 50, lr 0.05, n = 10, reuse bound 0.1, max reuse 0.5, 300 steps"]
    lines += ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.append(f"over {len(sp['seeds'])} seeds of the sampler: f/f0 median {sp['f_ratio_median']:.2g} "
                 f"(max {sp['f_ratio_max']:.2g}), queries median {sp['queries_median']:g} "
                 f"(range {sp['queries_min']}-{sp['queries_max']}); goal met by {sp['goal_met']}/{len(sp['seeds'])}")
    g = result["goal"]
    lines.append(f"goal f/f0 <= {g['f_ratio']:.2g} with <= {g['queries']:,} queries (seed 0): "
                 f"{'met' if g['met'] else 'NOT met'}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    with figure(path, 1, (6.4, 4.2)) as (fig, ax):
        for key, label in (("quadratic50", "zohpc LIZO (reuse)"), ("no_reuse", "zohpc LIZO (no reuse)")):
            curve = result[key]["curve"]
            ax.semilogy([c[0] for c in curve], [c[1] for c in curve], label=label)
        ref = PAPER["quadratic50"]
        ax.semilogy([ref["queries"]], [ref["f_ratio"]], "k*", markersize=10, label="ReLIZO reference (end)")
        ax.axhline(PAPER["goal"]["f_ratio"], color="grey", lw=0.6, ls=":")
        ax.axvline(PAPER["goal"]["queries"], color="grey", lw=0.6, ls=":")
        ax.set_xlabel("queries")
        ax.set_ylabel("f / f0")
        ax.set_title("LIZO on the ReLIZO reference quadratic (d = 50)")
        ax.grid(True, which="major", alpha=0.3)
        ax.legend()
        fig.tight_layout()


__all__ = ["PAPER", "run", "table", "plot", "quadratic", "solve"]
