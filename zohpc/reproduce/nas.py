"""``nas``: ReLIZO's architecture-search application in miniature (DARTS-style cell on the digits).

The search space is :mod:`zohpc.tasks.cell_search` (one cell, 6 edges, 6 candidate ops,
36 architecture weights). The digits training split (1,437) is cut into a search-train
part and a fixed validation part; the test split (360) is only used for the final figure.

Every search method gets the same ``steps`` backprop steps of the network weights (Adam,
minibatches of the search-train part, the same order for every method of a seed) and, for
the architecture, the same **query budget**: a query is one validation loss, one forward
pass of the search network over the whole validation part, at one architecture:

* ``lizo`` / ``lizo_no_reuse`` / ``zo_sgd``: the architecture weights ``alpha`` are
  optimized on the validation loss by ``zohpc.optim.LIZO`` (reuse bound 2 lr, max reuse
  rate 0.5), LIZO with reuse switched off, and ``zohpc.optim.ZOSGD`` (RGE), alternating
  with the weight steps as in first-order DARTS. The budget is spread evenly over phases of
  ``arch_interval`` weight steps: at the start of a phase a fresh optimizer takes
  architecture steps while one more step (at most ``n + 1`` queries) keeps its spending
  within ``budget * (weight steps up to the next phase) / steps``. So every method ends with
  at most ``budget`` and more than ``budget - n - 1`` queries, counted at the closure; reuse
  shows as *more architecture steps* for the same queries.
* ``random``: random search with weight sharing (Li and Talwalkar 2019): the same weight
  steps train the search network with one uniformly drawn architecture per step; then
  ``budget`` architectures drawn uniformly are each scored by one validation query on
  those shared weights, and the best is kept (exactly ``budget`` queries).
* ``darts``: first-order DARTS, ``alpha`` by Adam on the validation loss's gradient
  (backprop), one architecture step per weight step; its "queries" are these ``steps``
  validation forward-backward passes (gradients, not comparable to the ZO queries).

The search's final validation loss (reported, not counted: it chooses nothing) is that of
the mixed network at the final ``alpha``. The genotype (op of largest weight per edge) of
each method is then retrained from scratch
(the same initial weights, batch order and schedule for every method of a seed) on the
whole training split and tested. Seeds are split over the ranks in contiguous blocks (each
rank runs every method on its seeds, single-threaded); rank 0 gathers the figures.
"""

from __future__ import annotations

import math
import sys
import time

import numpy as np
import torch
from torch import nn

from ..seeding import derive_seed
from ..tasks.cell_search import EDGES, OPS, DiscreteNet, SearchNet, genotype, genotype_names
from ._common import train_backprop

from ..plotting import figure

PAPER = {
    "source": "ReLIZO (Wang et al., NeurIPS 2024): neural architecture search with LIZO as the "
              "architecture optimizer (their code is the base of EasyNAS)",
    "claim": "LIZO searches architectures competitive with gradient-based DARTS from loss values "
             "only (no figures compared: the paper's CIFAR/ImageNet search spaces are not reproduced)",
}

METHODS = ("lizo", "lizo_no_reuse", "zo_sgd", "random", "darts")
LABELS = {"lizo": "LIZO (reuse)", "lizo_no_reuse": "LIZO (no reuse)", "zo_sgd": "ZO-SGD (RGE)",
          "random": "random search (WS)", "darts": "DARTS (1st order)"}
ZO_METHODS = ("lizo", "lizo_no_reuse", "zo_sgd")

# The design (see the README section): ZO lr 10 for LIZO and ZO-SGD alike, the better of 3 and
# 10 for both on seed 0 by the search's final validation loss (LIZO 0.56 / 0.44, ZO-SGD 0.54 /
# 0.47); DARTS's Adam lr 3e-2 was not tuned. The architecture gradient is small (softmax
# mixing), so plain ZO steps need a large lr. reuse_bound None is ReLIZO's 2 lr; on seed 0 a
# bound of 1.0 reused exactly the same points and 0.3 nearly so (reuse rate 0.42 against 0.45).
SETTINGS = {
    False: dict(seeds=4, val_size=200, channels=6, steps=160, arch_interval=16, budget=500, retrain_channels=12,
                retrain_epochs=15),
    True: dict(seeds=2, val_size=64, channels=4, steps=16, arch_interval=8, budget=40, retrain_channels=4,
               retrain_epochs=1),
}
COMMON = dict(batch_size=64, w_lr=3e-3, samples=8, mu=2e-2, lizo_lr=10.0, zo_sgd_lr=10.0, darts_lr=3e-2,
              max_reuse_rate=0.5, reuse_bound=None, retrain_lr=3e-3)


# ---------------------------------------------------------------------------------------- data
def load_data(val_size: int):
    """Digits, normalized: (search-train x, y), (validation x, y), (train x, y), (test x, y).

    The validation part is a fixed seeded draw of ``val_size`` training examples (the same for
    every seed: the search objective is a property of the study, not of the seed)."""
    from ..data import normalize
    from ..data.builtin import load_digits_raw

    splits = normalize(load_digits_raw())
    n = splits.train_x.shape[0]
    if not 0 < val_size < n:
        raise ValueError(f"nas: val_size must be in (0, {n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed("nas-validation") % 2 ** 31))
    val, search = perm[:val_size].sort().values, perm[val_size:].sort().values
    return ((splits.train_x[search], splits.train_y[search]), (splits.train_x[val], splits.train_y[val]),
            (splits.train_x, splits.train_y), (splits.test_x, splits.test_y))


# ---------------------------------------------------------------------------------------- the search
class Budget:
    """Counts validation queries; spreads ``total`` evenly over ``steps`` weight steps in
    phases of ``interval`` weight steps."""

    def __init__(self, total: int, steps: int, interval: int = 1):
        self.total, self.steps, self.interval, self.spent = int(total), int(steps), max(1, int(interval)), 0

    def phase_start(self, k: int) -> bool:
        """Whether an architecture phase comes before weight step ``k``."""
        return k % self.interval == 0

    def allowance(self, k: int) -> int:
        """Queries a method may have spent by the end of the phase that starts at weight step ``k``
        (its share of the weight steps up to the next phase)."""
        end = min(self.steps, (k // self.interval + 1) * self.interval)
        return self.total * end // self.steps


def make_arch_optimizer(method: str, alpha: torch.Tensor, cfg: dict, seed: int):
    """A fresh ZO optimizer of ``alpha`` for ``method`` (public APIs only); one step costs at most ``n + 1`` queries."""
    from ..optim import LIZO, ZOSGD

    n, mu = cfg["samples"], cfg["mu"]
    if method == "lizo":  # None: ReLIZO's reuse bound 2 lr (the default)
        opt = LIZO([alpha], cfg["lizo_lr"], num_sample_per_step=n, reuse_distance_bound=cfg["reuse_bound"],
                   max_reuse_rate=cfg["max_reuse_rate"], sample_norm=mu, seed=seed)
    elif method == "lizo_no_reuse":
        opt = LIZO([alpha], cfg["lizo_lr"], num_sample_per_step=n, reuse_distance_bound=0.0, max_reuse_rate=0.0,
                   sample_norm=mu, seed=seed)
    elif method == "zo_sgd":
        opt = ZOSGD([alpha], cfg["zo_sgd_lr"], q=n, mu=mu, seed=seed)
    else:
        raise ValueError(f"nas: {method!r} is not a zeroth-order method")
    return opt


def search(method: str, data, s: dict, cfg: dict, seed: int, trace: bool = False) -> dict:
    """One method's search on one seed: the genotype, the queries spent and what the search saw."""
    (tx, ty), (vx, vy) = data[0], data[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("nas-supernet", seed) % 2 ** 31)
        net = SearchNet(s["channels"])
        alpha = nn.Parameter(1e-3 * torch.randn(EDGES, len(OPS)))
    w_opt = torch.optim.Adam(net.parameters(), lr=cfg["w_lr"])
    loss_fn = nn.functional.cross_entropy
    budget = Budget(s["budget"], s["steps"], s["arch_interval"])
    curve = []

    @torch.no_grad()
    def val_loss():  # the black box of the ZO methods: one query
        budget.spent += 1
        return float(loss_fn(net(vx, alpha=alpha), vy))

    step_cost, opt, counted = 0, None, {"queries": 0, "reused": 0, "fresh": 0}
    if method in ZO_METHODS:
        step_cost = cfg["samples"] + 1
    elif method == "darts":
        a_opt = torch.optim.Adam([alpha], lr=cfg["darts_lr"], betas=(0.5, 0.999))
    elif method != "random":
        raise ValueError(f"nas: unknown method {method!r}")
    draw = torch.Generator().manual_seed(derive_seed("nas-random-archs", seed) % 2 ** 31)

    arch_steps, k = 0, 0
    n, epoch = tx.shape[0], 0
    while k < s["steps"]:
        for idx in _batches(n, cfg["batch_size"], seed, epoch):
            if k >= s["steps"]:
                break
            # ---- architecture steps
            if method in ZO_METHODS and budget.phase_start(k):
                # a fresh optimizer per phase: the weights moved since the last one, so the
                # losses LIZO kept no longer hold (and new directions for ZO-SGD)
                _add_counts(counted, opt)
                opt = make_arch_optimizer(method, alpha, cfg, derive_seed("nas-directions", seed, k) % 2 ** 31)
                while budget.spent + step_cost <= budget.allowance(k):
                    loss = opt.step(val_loss)
                    arch_steps += 1
                    if trace:
                        curve.append([budget.spent, float(loss)])
            elif method == "darts":
                a_opt.zero_grad(set_to_none=True)
                loss = loss_fn(net(vx, alpha=alpha), vy)
                loss.backward()
                a_opt.step()
                budget.spent += 1
                arch_steps += 1
                if trace:
                    curve.append([budget.spent, float(loss.detach())])
            # ---- one weight step (alpha fixed; random search: one random architecture)
            w_opt.zero_grad(set_to_none=True)
            if method == "random":
                out = net(tx[idx], genotype=torch.randint(len(OPS), (EDGES,), generator=draw).tolist())
            else:
                out = net(tx[idx], alpha=alpha.detach())
            loss_fn(out, ty[idx]).backward()
            w_opt.step()
            k += 1
        epoch += 1

    result = {"arch_steps": arch_steps}
    if method == "random":
        best, best_loss = None, math.inf
        with torch.no_grad():
            for _ in range(s["budget"]):
                geno = torch.randint(len(OPS), (EDGES,), generator=draw).tolist()
                budget.spent += 1
                loss = float(loss_fn(net(vx, genotype=geno), vy))
                if loss < best_loss:
                    best, best_loss = geno, loss
                if trace:
                    curve.append([budget.spent, best_loss])
        result.update(genotype=best, search_val_loss=best_loss)
    else:
        with torch.no_grad():
            result.update(genotype=genotype(alpha), search_val_loss=float(loss_fn(net(vx, alpha=alpha), vy)))
    result["queries"] = budget.spent
    if method in ("lizo", "lizo_no_reuse"):
        _add_counts(counted, opt)
        if counted["queries"] != budget.spent:
            raise RuntimeError(f"nas: LIZO counted {counted['queries']} queries, the closure {budget.spent}")
        result["reuse_rate"] = counted["reused"] / max(1, counted["reused"] + counted["fresh"])
    if trace:
        result["curve"] = curve
    return result


def _add_counts(total: dict, opt) -> None:
    """Add a LIZO's query counters to ``total`` (ZO-SGD, or none yet: nothing)."""
    if opt is not None and hasattr(opt, "counters"):
        c = opt.counters()
        for key in total:
            total[key] += c[key]


def _batches(n: int, batch_size: int, seed: int, epoch: int):
    from ..data import epoch_batches

    return epoch_batches(n, batch_size, derive_seed("nas-batches", seed), epoch)


def retrain(geno: list[int], data, s: dict, cfg: dict, seed: int) -> float:
    """Test accuracy of ``geno`` trained from scratch (the same start and batches for any genotype of a seed)."""
    (x, y), (test_x, test_y) = data[2], data[3]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("nas-retrain", seed) % 2 ** 31)
        net = DiscreteNet(geno, s["retrain_channels"])
    train_backprop(net, x, y, nn.functional.cross_entropy, epochs=s["retrain_epochs"], batch_size=cfg["batch_size"],
                   lr=cfg["retrain_lr"], seed=derive_seed("nas-retrain-batches", seed))
    net.eval()
    with torch.no_grad():
        return float((net(test_x).argmax(1) == test_y).double().mean())


# ---------------------------------------------------------------------------------------- the study
FIELDS = ("accuracy", "queries", "arch_steps", "search_val_loss", "reuse_rate", "search_cpu_seconds",
          "cpu_seconds")  # + EDGES genotype


def run_seed(seed: int, data, s: dict, cfg: dict, trace: bool) -> tuple[dict, dict]:
    """Every method on one seed: ``({method: record}, {method: curve})``."""
    rows, curves, retrained = {}, {}, {}
    for m in METHODS:
        t0 = time.process_time()
        r = search(m, data, s, cfg, seed, trace=trace)
        r["search_cpu_seconds"] = time.process_time() - t0
        key = tuple(r["genotype"])  # a retrain is deterministic per (genotype, seed): once each
        if key not in retrained:
            t1 = time.process_time()
            acc = retrain(r["genotype"], data, s, cfg, seed)
            retrained[key] = (acc, time.process_time() - t1)
        # a method's cost includes its genotype's retrain, also when another method paid for it
        r["accuracy"], retrain_seconds = retrained[key]
        r["cpu_seconds"] = r["search_cpu_seconds"] + retrain_seconds
        print(f"nas: seed {seed} {m}: test accuracy {100 * r['accuracy']:.2f}%, {r['queries']} queries, "
              f"{r['arch_steps']} architecture steps, {r['cpu_seconds']:.0f} s CPU", file=sys.stderr, flush=True)
        curves[m] = r.pop("curve", [])
        rows[m] = r
    return rows, curves


def run(comm, out_dir: str, quick: bool) -> dict:
    from ..sharding import contiguous_split

    s, cfg = SETTINGS[bool(quick)], dict(COMMON)
    torch.set_num_threads(1)
    data = load_data(s["val_size"])
    size, rank = (comm.size, comm.rank) if comm is not None else (1, 0)
    seeds = list(range(s["seeds"]))
    # the larger blocks first, so rank 0 always holds seed 0 (whose curves it reports), even
    # with more ranks than seeds
    bounds = [len(seeds) - b for b in reversed(contiguous_split(len(seeds), size))]
    width = len(METHODS) * (len(FIELDS) + EDGES)
    local, curves = [], {}
    for i in range(bounds[rank], bounds[rank + 1]):
        rows, c = run_seed(seeds[i], data, s, cfg, trace=(i == 0))
        if i == 0:
            curves = c
        for m in METHODS:
            r = rows[m]
            local += [float(r.get(f, float("nan"))) for f in FIELDS] + [float(g) for g in r["genotype"]]
    counts = [(bounds[r + 1] - bounds[r]) * width for r in range(size)]
    flat = torch.tensor(local, dtype=torch.float64)
    every = comm.gatherv(flat, counts) if comm is not None and size > 1 else flat
    if every is None:  # not the driver: rank 0 reports
        return {}
    table_ = every.view(len(seeds), len(METHODS), len(FIELDS) + EDGES).numpy()
    methods = {}
    for j, m in enumerate(METHODS):
        per_seed = []
        for i, seed in enumerate(seeds):
            row = table_[i, j]
            rec = {"seed": seed, **{f: _num(row[q]) for q, f in enumerate(FIELDS)}}
            rec["genotype"] = genotype_names([int(g) for g in row[len(FIELDS):]])
            per_seed.append(rec)
        acc = np.array([p["accuracy"] for p in per_seed])
        methods[m] = {
            "accuracy": float(acc.mean()),
            "accuracy_se": float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else None,
            "queries": float(np.mean([p["queries"] for p in per_seed])),
            "arch_steps": float(np.mean([p["arch_steps"] for p in per_seed])),
            "genotype": per_seed[0]["genotype"],
            "per_seed": per_seed,
        }
        if m in ("lizo", "lizo_no_reuse"):
            methods[m]["reuse_rate"] = float(np.mean([p["reuse_rate"] for p in per_seed]))
    return {
        "methods": methods,
        "goal": goal(methods),
        "budget": s["budget"],
        "weight_steps": s["steps"],
        "seeds": seeds,
        "samples_per_step": cfg["samples"],
        "settings": {**s, **cfg},
        "ops": list(OPS),
        "curves_seed0": curves,
    }


def _num(v):
    v = float(v)
    return None if math.isnan(v) else (int(v) if v.is_integer() and abs(v) < 2 ** 53 else v)


def goal(methods: dict) -> dict:
    """LIZO with reuse at least random search and ZO-SGD in mean test accuracy over the seeds.

    Beside it, paired per-seed differences (mean and standard error: the seeds share the
    weights' start, batches and retraining, so pairing removes what the methods share) of
    the test accuracy, and of the final validation loss against the other ZO methods (the
    objective the optimizers minimize, at the same queries)."""
    def paired(key, a, b):
        d = np.array([p[key] - q[key] for p, q in zip(methods[a]["per_seed"], methods[b]["per_seed"])], dtype=float)
        return {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else None}

    acc = {m: paired("accuracy", "lizo", m) for m in ("random", "zo_sgd", "lizo_no_reuse", "darts")}
    val = {m: paired("search_val_loss", "lizo", m) for m in ("zo_sgd", "lizo_no_reuse")}
    met = all(methods["lizo"]["accuracy"] >= methods[m]["accuracy"] for m in ("random", "zo_sgd"))
    return {"met": bool(met), "accuracy_lizo_minus": acc, "val_loss_lizo_minus": val}


def table(result: dict) -> str:
    ms = result["methods"]
    lines = [
        f"nas: DARTS-style cell on the digits ({EDGES} edges x {len(OPS)} ops), {len(result['seeds'])} seed(s), "
        f"{result['weight_steps']} weight steps, {result['budget']} validation queries per search, "
        f"{result['samples_per_step']} directions per ZO step",
        f"{'method':20s} {'test acc':>9s} {'(+- s.e.)':>9s} {'val loss':>8s} {'queries':>8s} {'arch steps':>10s} "
        f"{'reuse':>6s}  genotype (seed 0)",
    ]
    for m in METHODS:
        r = ms[m]
        val = float(np.mean([p["search_val_loss"] for p in r["per_seed"]]))
        se = "" if r["accuracy_se"] is None else f"{100 * r['accuracy_se']:.2f}"
        reuse = f"{r['reuse_rate']:.2f}" if "reuse_rate" in r else ""
        q = f"{r['queries']:.0f}" + ("*" if m == "darts" else "")
        lines.append(f"{LABELS[m]:20s} {100 * r['accuracy']:8.2f}% {se:>9s} {val:8.4f} {q:>8s} {r['arch_steps']:10.0f} "
                     f"{reuse:>6s}  {' '.join(g.split(':')[1] for g in r['genotype'])}")
    g = result["goal"]
    lines.append("* DARTS: validation gradient steps (forward + backward), not loss-only queries")
    lines.append("val loss: the search's final validation loss (mixed network at the final alpha; random: the "
                 "best sampled architecture on the shared weights), mean over the seeds")
    lines.append(f"paper ({PAPER['source']}): {PAPER['claim']}")
    def pm(d, scale=1.0, fmt="+.2f"):
        se = "" if d["se"] is None else f" +- {scale * d['se']:{fmt[1:]}}"
        return f"{scale * d['mean']:{fmt}}{se}"

    acc = ", ".join(f"{pm(d, 100)} vs {LABELS[m]}" for m, d in g["accuracy_lizo_minus"].items())
    val = ", ".join(f"{pm(d, 1.0, '+.4f')} vs {LABELS[m]}" for m, d in g["val_loss_lizo_minus"].items())
    lines.append(f"goal (LIZO with reuse >= random search and ZO-SGD, mean test accuracy at equal queries): "
                 f"{'met' if g['met'] else 'NOT met'}")
    lines.append(f"LIZO (reuse) minus, paired over seeds (mean +- s.e.): test accuracy (points) {acc}; "
                 f"final validation loss {val}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    with figure(path, 2, (10, 4)) as (fig, (ax0, ax1)):
        ms = result["methods"]
        for i, m in enumerate(METHODS):
            r = ms[m]
            accs = [100 * p["accuracy"] for p in r["per_seed"]]
            ax0.bar(i, 100 * r["accuracy"], yerr=None if r["accuracy_se"] is None else 100 * r["accuracy_se"],
                    color=f"C{i}", alpha=0.6, capsize=4)
            ax0.plot([i] * len(accs), accs, "k.", ms=4)
        ax0.set_xticks(range(len(METHODS)))
        ax0.set_xticklabels([LABELS[m] for m in METHODS], rotation=20, ha="right", fontsize=8)
        lo = min(100 * p["accuracy"] for m in METHODS for p in ms[m]["per_seed"])
        ax0.set_ylim(max(0.0, lo - 3), 100)
        ax0.set_ylabel("test accuracy of the retrained cell (%)")
        ax0.set_title(f"{len(result['seeds'])} seed(s), {result['budget']} queries")
        for i, m in enumerate(METHODS):
            curve = result["curves_seed0"].get(m) or []
            if curve and m != "darts":
                ax1.plot([c[0] for c in curve], [c[1] for c in curve], color=f"C{i}", label=LABELS[m])
        ax1.set_xlabel("validation queries")
        ax1.set_ylabel("validation loss (random: best so far)")
        ax1.set_title("search, seed 0")
        ax1.legend(fontsize=8)
        fig.tight_layout()


__all__ = ["PAPER", "METHODS", "run", "table", "plot", "search", "retrain", "load_data", "Budget"]
