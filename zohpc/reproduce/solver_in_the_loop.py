"""Solver in the loop (DeepZero Sec. 6 after Um et al., NeurIPS 2020), in miniature.

A coarse numpy solver of 1-D viscous Burgers (:mod:`zohpc.tasks.burgers`) is corrected by a
small CNN. Mean absolute error of test rollouts against the fine-grid reference, for

* SRC: the coarse solver alone;
* NON: the corrector trained by backprop on per-step pairs along the reference
  (``r_k - S(r_{k-1})``), the solver never run on its outputs;
* ZO-SOL: the corrector trained through the black-box numpy solver, unrolled over the
  window, by sparse CGE over MPI (``zohpc.run``);
* FO-SOL: the same unrolled objective with the solver written in torch, trained by backprop
  (the white-box upper bound).

All four use the same corrector, initial weights, minibatches, optimizer (Adam), lr,
cosine schedule and epochs; they differ in the objective and in how its gradient is had.
"""

from __future__ import annotations

import numpy as np
import torch

from ..tasks import burgers
from ._common import pyplot, save_figure, train_backprop

PAPER = {"mae": {"src": 0.180, "non": 0.153, "zo_sol": 0.119, "fo_sol": 0.074}}
METHODS = (("src", "SRC"), ("non", "NON"), ("zo_sol", "ZO-SOL"), ("fo_sol", "FO-SOL"))

TASK = {**burgers.DEFAULTS, "nu": 0.005, "test_trajectories": 32}
TRAIN = {"epochs": 100, "batch_size": 32, "lr": 3e-3, "seed": 0}
QUICK = {"epochs": 15, "lr": 1e-2}
# sparse CGE: layer-wise random masks of 50% of the conv weights (biases always active),
# redrawn every epoch; central differences. The forward difference is biased by mu/2 * f'' (about
# 2e-4 per last-layer weight at mu = 5e-3 here); Adam normalizes the step, so once the true
# gradient is small that bias steers the weights (a masked-backprop simulation with that bias
# ended worse than SRC); central differences are unbiased to O(mu^2), at twice the queries.
ZO = ["zo.estimator=cge", "zo.mu=5e-3", "zo.difference=central", "prune.method=random",
      "prune.sparsity=0.5", "prune.mask_interval=1", "optim.name=adam", "optim.schedule=cosine",
      "optim.warmup_epochs=0", "optim.weight_decay=0.0"]


def settings(quick: bool) -> dict:
    return {**TRAIN, **(QUICK if quick else {})}


def zo_overrides(s: dict) -> list[str]:
    return ZO + [f"train.epochs={s['epochs']}", f"train.seed={s['seed']}", f"optim.lr={s['lr']}",
                 f"data.batch_size={s['batch_size']}", f"data.test_batch_size=100000",
                 "checkpoint.every_epochs=0"]


def train_zo(task, s: dict) -> dict:
    """ZO-SOL: ``zohpc.run`` on every rank (the one line that needs MPI)."""
    import zohpc

    return zohpc.run(task, overrides=zo_overrides(s), save=False)


def train_non(data: burgers.BurgersData, s: dict):
    """NON: supervised regression of the per-step corrections along the reference."""
    opts = data.opts
    model = burgers.make_model(opts, s["seed"])
    x = burgers.as_inputs(data.train_windows[:, 0])
    target = torch.from_numpy(burgers.supervised_targets(data.solver, data.train_windows)).float()

    def loss(out, t):
        return ((out.reshape(t.shape) - t) ** 2).mean()

    seconds = train_backprop(model, x, target, loss, epochs=s["epochs"], batch_size=s["batch_size"],
                             lr=s["lr"], seed=s["seed"])
    return model, seconds


def train_fo_sol(data: burgers.BurgersData, s: dict):
    """FO-SOL: backprop through the unrolled torch copy of the solver."""
    model = burgers.make_model(data.opts, s["seed"])
    x, y = data.pairs(data.train_windows)
    seconds = train_backprop(model, x, y, lambda out, t: burgers.unrolled_torch_loss(data.solver, out, t),
                             epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], seed=s["seed"])
    return model, seconds


def evaluate(data: burgers.BurgersData, model) -> tuple[float, list[float], np.ndarray]:
    """Rollout MAE over the test trajectories, its value per step, and the rollouts."""
    traj = burgers.rollout(data.solver, model, data.test_traj[:, 0], data.test_traj.shape[1] - 1, data.unroll)
    err = np.abs(traj - data.test_traj)
    return float(err[:, 1:].mean()), [float(v) for v in err.mean((0, 2))], traj


def run(comm, out_dir: str, quick: bool) -> dict:
    s = settings(quick)
    data = burgers.BurgersData(TASK)  # deterministic: every rank builds the same
    task = burgers.make_task(TASK, s["seed"], data)
    summary = train_zo(task, s)
    if not comm.is_driver:
        return {}
    non, non_seconds = train_non(data, s)
    fo, fo_seconds = train_fo_sol(data, s)
    mae, per_step, sample = {}, {}, {}
    for key, model in (("src", None), ("non", non), ("zo_sol", task.model), ("fo_sol", fo)):
        mae[key], per_step[key], traj = evaluate(data, model)
        sample[key] = [float(v) for v in traj[0, -1]]
    sample["reference"] = [float(v) for v in data.test_traj[0, -1]]
    params = sum(p.numel() for p in task.model.parameters())
    return {
        "mae": mae,
        "mae_per_step": per_step,
        "sample_final_state": sample,
        "seconds": {"zo_sol": float(summary.get("seconds", float("nan"))), "non": non_seconds,
                    "fo_sol": fo_seconds},
        "zo_queries": int(summary.get("queries", 0)),
        "zo_steps": int(summary.get("steps", 0)),
        "settings": {**s, "task": TASK, "zo": ZO, "params": params, "ranks": comm.size},
    }


def table(result: dict) -> str:
    mae, paper = result["mae"], PAPER["mae"]
    lines = [f"solver in the loop: rollout MAE on {result['settings']['task']['test_trajectories']} test "
             f"trajectories ({result['settings']['epochs']} epochs, {result['settings']['params']} parameters)",
             f"{'method':<8} {'MAE here':>10} {'vs SRC':>8} {'paper':>8} {'vs SRC':>8}"]
    for key, name in METHODS:
        lines.append(f"{name:<8} {mae[key]:>10.4f} {mae[key] / mae['src']:>8.2f} "
                     f"{paper[key]:>8.3f} {paper[key] / paper['src']:>8.2f}")
    order = [mae[k] for k, _ in METHODS]
    ordered = all(a > b for a, b in zip(order, order[1:]))
    lines.append(f"paper's ordering SRC > NON > ZO-SOL > FO-SOL: {'met' if ordered else 'NOT met'}; "
                 f"ZO-SOL {100 * (1 - mae['zo_sol'] / mae['src']):.0f}% below SRC (goal >= 25%)")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for key, name in METHODS:
        ax1.plot(result["mae_per_step"][key], label=f"{name} ({result['mae'][key]:.4f})")
    ax1.set_xlabel("coarse step")
    ax1.set_ylabel("mean absolute error")
    ax1.set_title("test rollouts vs fine-grid reference")
    ax1.legend()
    sample = result["sample_final_state"]
    ax2.plot(sample["reference"], "k-", lw=2, label="reference")
    for key, name in METHODS:
        ax2.plot(sample[key], label=name)
    ax2.set_xlabel("coarse cell")
    ax2.set_ylabel("u")
    ax2.set_title("test trajectory 0 at the last step")
    ax2.legend()
    save_figure(fig, path)
    plt.close(fig)
