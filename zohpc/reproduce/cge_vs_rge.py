"""CGE vs RGE on small CNNs (DeepZero's table for 730 to 12,610 parameters), on digits.

DeepZero's adjustable CNN ``cnn_d1`` .. ``cnn_d5`` (1 to 5 conv-BN-ReLU-pool blocks of 18
channels) is trained three ways from the same initial weights, minibatches, optimizer,
schedule and number of epochs: backpropagation (FO, a plain torch loop), dense CGE and RGE
(both ``zohpc.run`` over MPI). The 8x8 digits are fed as 3-channel images (the gray value in
each channel) so the models have exactly the paper's parameter counts (730, 3,700, 6,670,
9,640, 12,610 for 3 input channels and 10 classes).

Training time of CGE with and without feature reuse (``zo.feature_reuse=false``: a full
forward per query) is the mean time of the same steps 2..1+timing_steps (the first step pays
one-off warm-up; a whole run without reuse of the largest model would not fit the budget), read
from the ``event == "step"`` records of the runs' histories, so start-up is not counted.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.nn.functional as F

from ..data import load_digits_raw, normalize
from ..models.cnn import AdjustableCNN
from ..seeding import derive_seed
from ..tasks import Task
from ..plotting import figure
from ._common import train_backprop

PAPER = {
    "params": [730, 3700, 6670, 9640, 12610],
    "fo": [42.09, 60.47, 70.69, 76.64, 77.01],
    "cge": [41.65, 59.66, 70.04, 76.07, 76.95],
    "rge": [37.53, 50.06, 65.31, 70.05, 68.38],
    "reuse_speedup_at_12610": 2.4,
}

# Budget (15 min under 2 ranks on 2 busy cores): dense CGE of cnn_d5 costs ~3 s per step at
# batch 128 here (12,610 queries), a step without reuse ~13 s; 4 epochs of 12 steps for the five
# sizes plus the timing runs take ~10 min.
FULL = {"depths": [1, 2, 3, 4, 5], "epochs": 4, "batch_size": 128, "lr": 0.1, "rge_lr": 0.1,
        "rge_queries": 64, "timing_steps": 2, "seed": 0}
QUICK = {"depths": [1, 2], "epochs": 2, "batch_size": 128, "lr": 0.1, "rge_lr": 0.1,
         "rge_queries": 64, "timing_steps": 1, "seed": 0}
# same optimizer for all three: SGD with momentum 0.9, cosine schedule, no weight decay
COMMON = ["optim.name=sgd", "optim.momentum=0.9", "optim.schedule=cosine", "optim.warmup_epochs=0",
          "optim.weight_decay=0.0", "prune.method=none", "zo.mu=5e-3", "zo.difference=forward",
          "checkpoint.every_epochs=0", "data.test_batch_size=100000"]


def settings(quick: bool) -> dict:
    return dict(QUICK if quick else FULL)


def digits_rgb():
    """Digits as ``(N, 3, 8, 8)`` float32 (the normalized gray value in each channel)."""
    s = normalize(load_digits_raw())

    def rgb(x):
        return x.repeat(1, 3, 1, 1).contiguous()

    return rgb(s.train_x), s.train_y, rgb(s.test_x), s.test_y


def make_model(depth: int, seed: int) -> AdjustableCNN:
    """``cnn_d<depth>`` for 3x8x8 inputs, initialized from the ``cge-vs-rge-init`` stream (torch's default init)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("cge-vs-rge-init", seed, depth))
        return AdjustableCNN(depth, 3, 10)


@torch.no_grad()
def accuracy(model, x, y) -> float:
    """Test accuracy in percent (eval mode: BatchNorm running statistics)."""
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).double().mean()) * 100
    model.train(was)
    return acc


def _metric(outputs, targets):
    return {"accuracy": float((outputs.argmax(1) == targets).double().mean())}


def zo_train(model, data, overrides: list[str]) -> dict:
    """Train ``model`` in place with ``zohpc.run`` on every rank; the summary, with ``wall``: the
    seconds of this call (the summary's own ``seconds`` counts from process start)."""
    import zohpc

    x, y, xt, yt = data
    task = Task(model=model, train=(x, y), test=(xt, yt), loss=None, metrics=_metric, name="classify")
    t0 = time.perf_counter()
    summary = zohpc.run(task, overrides=overrides, save=False)
    return {**summary, "wall": time.perf_counter() - t0}


def step_seconds(summary: dict, first: int, last: int) -> float:
    """Mean seconds of steps ``first..last`` (1-based) from the run's history: the records with
    ``event == "step"`` carry the step's wall time on this rank, start-up and evaluation excluded."""
    times = [float(h["seconds"]) for h in summary.get("history", [])
             if isinstance(h, dict) and h.get("event") == "step" and first <= int(h.get("step", 0)) <= last]
    if len(times) != last - first + 1:
        raise RuntimeError(f"cge_vs_rge: the run's history holds {len(times)} of steps {first}..{last}")
    return sum(times) / len(times)


def run(comm, out_dir: str, quick: bool) -> dict:
    s = settings(quick)
    data = digits_rgb()
    x, y, xt, yt = data
    base = [f"train.epochs={s['epochs']}", f"train.seed={s['seed']}", f"data.batch_size={s['batch_size']}"]
    rows = []
    for depth in s["depths"]:
        init = make_model(depth, s["seed"])
        row = {"depth": depth, "params": sum(p.numel() for p in init.parameters())}
        row["init"] = accuracy(init, xt, yt)

        cge = copy.deepcopy(init)
        summary = zo_train(cge, data, COMMON + base + ["zo.estimator=cge", f"optim.lr={s['lr']}"])
        row["cge"] = accuracy(cge, xt, yt)
        row["cge_train_seconds"] = summary["wall"]
        row["cge_queries"] = int(summary.get("queries", 0))
        # step time with and without feature reuse, on the same steps 2..1+timing_steps (the first
        # step pays one-off warm-up); the run without reuse stops after them
        first, last = 2, 1 + s["timing_steps"]
        row["cge_seconds"] = step_seconds(summary, first, last)
        no_reuse = zo_train(copy.deepcopy(init), data, COMMON + base + [
            "zo.estimator=cge", f"optim.lr={s['lr']}", f"train.max_steps={last}", "zo.feature_reuse=false"])
        row["cge_no_reuse_seconds"] = step_seconds(no_reuse, first, last)

        rge = copy.deepcopy(init)
        summary = zo_train(rge, data, COMMON + base + ["zo.estimator=rge", f"optim.lr={s['rge_lr']}",
                                                         f"zo.rge_queries={s['rge_queries']}"])
        row["rge"] = accuracy(rge, xt, yt)
        row["rge_train_seconds"] = summary["wall"]
        row["rge_queries"] = int(summary.get("queries", 0))

        if comm.is_driver:
            fo = copy.deepcopy(init)
            row["fo_seconds"] = train_backprop(fo, x, y, F.cross_entropy, epochs=s["epochs"],
                                               batch_size=s["batch_size"], lr=s["lr"], seed=s["seed"],
                                               optimizer="sgd", momentum=0.9)
            row["fo"] = accuracy(fo, xt, yt)
        rows.append(row)
    if not comm.is_driver:
        return {}
    return {"rows": rows, "settings": {**s, "common": COMMON, "ranks": comm.size,
                                       "timing": f"cge_seconds / cge_no_reuse_seconds: mean step time of steps 2.."
                                                 f"{1 + s['timing_steps']} (rank 0, start-up excluded)"}}


def table(result: dict) -> str:
    st = result["settings"]
    lines = [f"CGE vs RGE on digits (3x8x8), {st['epochs']} epochs, batch {st['batch_size']}, "
             f"RGE q={st['rge_queries']}; test accuracy %  [paper: CIFAR-10]",
             f"{'params':>7} {'FO':>6} {'CGE':>6} {'RGE':>6} {'CGE-FO':>7} | {'paper FO':>8} {'CGE':>6} {'RGE':>6}"
             f" | {'reuse s':>8} {'no-reuse s':>10} {'speedup':>7}"]
    paper = {n: i for i, n in enumerate(PAPER["params"])}
    ok_cge = ok_rge = True
    for r in result["rows"]:
        i = paper.get(r["params"])
        pp = (f"{PAPER['fo'][i]:>8.2f} {PAPER['cge'][i]:>6.2f} {PAPER['rge'][i]:>6.2f}" if i is not None
              else f"{'-':>8} {'-':>6} {'-':>6}")
        speed = r["cge_no_reuse_seconds"] / r["cge_seconds"] if r["cge_seconds"] > 0 else float("nan")
        lines.append(f"{r['params']:>7} {r['fo']:>6.2f} {r['cge']:>6.2f} {r['rge']:>6.2f} {r['cge'] - r['fo']:>+7.2f} | "
                     f"{pp} | {r['cge_seconds']:>8.2f} {r['cge_no_reuse_seconds']:>10.2f} {speed:>6.1f}x")
        ok_cge &= abs(r["cge"] - r["fo"]) <= 1.0
        ok_rge &= r["rge"] < r["cge"]
    lines.append(f"CGE within 1 point of FO at every size: {'met' if ok_cge else 'NOT met'}; "
                 f"RGE below CGE at every size: {'met' if ok_rge else 'NOT met'}; "
                 f"paper's reuse speedup at 12,610: {PAPER['reuse_speedup_at_12610']}x")
    lines.append(f"timing: {st['timing']}")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    rows = result["rows"]
    n = [r["params"] for r in rows]
    with figure(path, 2, (11, 4)) as (fig, (ax1, ax2)):
        for key, name, style in (("fo", "FO", "o-"), ("cge", "CGE", "s-"), ("rge", "RGE", "^-")):
            ax1.plot(n, [r[key] for r in rows], style, label=f"{name} (digits)")
            ax1.plot(PAPER["params"], PAPER[key], style, alpha=0.35, label=f"{name} (paper, CIFAR-10)")
        ax1.set_xlabel("parameters")
        ax1.set_ylabel("test accuracy %")
        ax1.legend(fontsize=7)
        ax2.plot(n, [r["cge_no_reuse_seconds"] / r["cge_seconds"] for r in rows], "s-", label="here")
        ax2.plot([PAPER["params"][-1]], [PAPER["reuse_speedup_at_12610"]], "r*", ms=12, label="paper")
        ax2.set_xlabel("parameters")
        ax2.set_ylabel("CGE time without / with feature reuse")
        ax2.legend()
