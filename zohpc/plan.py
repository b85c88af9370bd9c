"""``python -m zohpc.plan``: how long a sparse-CGE run takes at P ranks, before it is submitted.

    python -m zohpc.plan --config F [--set section.key=value ...] --ranks P [--device cpu|cuda]
                         [--threads T] [--slurm] [--json]

It calibrates on this machine with the code training runs at start-up (the work model
:func:`zohpc.zo.work.plan_work` through :func:`zohpc.zo.costs.calibrate`: a few timed stacked
passes fitted against FLOPs), times one cached forward and one update, and predicts:

* ``step_seconds``: the driver's forward, then the slowest shard of the cost-balanced layout
  (:func:`zohpc.sharding.balanced_bounds`, as the step cuts it), started after the workers'
  own forward (``recompute``) or the features' broadcast, whichever is cheaper (what
  ``zo.features = "auto"`` picks), plus the gather, the driver's update and the parameters'
  broadcast;
* ``epoch_seconds`` (steps of the epoch plus evaluation split over the ranks) and
  ``run_seconds`` (start-up calibration plus every epoch);
* ``imbalance`` (max / mean predicted shard time), ``comm_bytes_per_step`` (bytes every
  collective of a step delivers, summed over the receiving ranks) and ``memory_per_rank_mb``
  (the peak measured while planning: the data set, the model, the cached features and the
  largest stacked pass, as a rank of the run holds them).

The model's assumptions, stated in the README ("Planning a run"): ranks do not slow each
other (one core or one GPU each, memory bandwidth not shared), collectives follow a binary
tree over a network of ``--bandwidth-gbs`` and ``--latency-us`` (defaults
:data:`DEFAULT_BANDWIDTH_GBS`, :data:`DEFAULT_LATENCY_US`), masks are layer-wise random at
``prune.sparsity`` (ZO-GraSP's own ratios take minutes to compute; a ``prune.masks_file`` is
read as is), and pruning at start-up is not counted. ``ZOHPC_CLOCK=cpu`` calibrates on
process CPU time (:mod:`zohpc.timing`) on a loaded machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
from dataclasses import dataclass

import torch

from .errors import ConfigError, UserError

DEFAULT_BANDWIDTH_GBS = 10.0  # GB/s per link: 100 Gb/s InfiniBand HDR/EDR delivers ~10-12 GB/s
DEFAULT_LATENCY_US = 5.0  # microseconds per message hop (InfiniBand MPI: 1-5 us)
DEFAULT_MARGIN = 1.25  # the time limit is the predicted run times this, plus the signal lead
SIGNAL_LEAD_SECONDS = 120  # jobs/train.sbatch: --signal=B:USR1@120 (checkpoint before the limit)
DEFAULT_BUDGET = 8.0  # seconds of timed passes (start-up spends 2 s; more samples fit better)
REPEATS = 10  # passes per calibration sample, their median kept (start-up: the fastest of 3)


class _Parser(argparse.ArgumentParser):
    """Bad options: one line naming the culprit, exit 2 (no usage dump)."""

    def error(self, message):
        sys.stderr.write(f"zohpc.plan: error: {message}\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m zohpc.plan", description="Predict the step, epoch and run time of a "
                "sparse-CGE run at P ranks (and its sbatch header) from a few timed passes on this machine.")
    p.add_argument("--config", metavar="FILE", help="TOML config (defaults: the embedded digits run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--ranks", type=int, required=True, metavar="P", help="MPI ranks of the planned run")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the ranks compute (one GPU each)")
    p.add_argument("--threads", type=int, default=1, metavar="T", help="threads per rank (CPU runs)")
    p.add_argument("--ranks-per-node", type=int, default=0, metavar="R",
                   help="for --slurm: ranks on one node (default: --gpus-per-node with cuda, else all on one)")
    p.add_argument("--gpus-per-node", type=int, default=4, metavar="G", help="for --slurm with cuda (default 4)")
    p.add_argument("--bandwidth-gbs", type=float, default=DEFAULT_BANDWIDTH_GBS,
                   help=f"network bandwidth per link in GB/s (default {DEFAULT_BANDWIDTH_GBS})")
    p.add_argument("--latency-us", type=float, default=DEFAULT_LATENCY_US,
                   help=f"latency per message hop in microseconds (default {DEFAULT_LATENCY_US})")
    p.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                   help=f"time limit = predicted run x margin + signal lead (default {DEFAULT_MARGIN})")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET, metavar="S",
                   help=f"seconds of timed passes in the calibration (default {DEFAULT_BUDGET})")
    p.add_argument("--train-examples", type=int, default=0, metavar="N",
                   help="training examples per epoch (default: the data set's; for a data set not at hand, "
                        "plan on data.name = 'synthetic' of the same shape and give its size here)")
    p.add_argument("--slurm", action="store_true", help="print the #SBATCH lines of the run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


MAX_RANKS = 100_000  # (the shard layout is cut per rank: a bound keeps a typo from running for hours)


def check_args(args) -> None:
    """Bad numbers, before any heavy work (one line each)."""
    for name, value, least in (("--ranks", args.ranks, 1), ("--threads", args.threads, 1),
                               ("--gpus-per-node", args.gpus_per_node, 1), ("--ranks-per-node", args.ranks_per_node, 0),
                               ("--train-examples", args.train_examples, 0)):
        if value < least:
            raise UserError(f"{name} must be >= {least}, got {value}")
    for name, value in (("--bandwidth-gbs", args.bandwidth_gbs), ("--latency-us", args.latency_us),
                        ("--budget", args.budget)):
        if not (value > 0 and math.isfinite(value)):
            raise UserError(f"{name} must be a positive number, got {value}")
    if args.ranks > MAX_RANKS:
        raise UserError(f"--ranks must be <= {MAX_RANKS:,}, got {args.ranks:,}")
    if not (args.margin >= 1 and math.isfinite(args.margin)):
        raise UserError(f"--margin must be >= 1, got {args.margin}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available on this machine (plan on the machine that "
                        "will run, or with --device cpu)")


@dataclass
class Network:
    """Collectives on a binary tree: ``ceil(log2 P)`` hops of ``latency + bytes / bandwidth``."""

    bandwidth: float  # bytes per second
    latency: float  # seconds

    def hops(self, ranks: int) -> int:
        return math.ceil(math.log2(ranks)) if ranks > 1 else 0

    def bcast(self, nbytes: float, ranks: int) -> float:
        return self.hops(ranks) * (self.latency + nbytes / self.bandwidth)

    def gather(self, total_bytes: float, ranks: int) -> float:
        """Every rank's piece to the root: the root's link carries all but its own piece."""
        return self.hops(ranks) * self.latency + total_bytes * (ranks - 1) / max(1, ranks) / self.bandwidth


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process so far: the device's allocations on CUDA, resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _masks(cfg, model):
    from .config import DENSE_ESTIMATORS, estimator_name
    from .masks import layerwise_random_masks, maskable_names, read_mask_file

    if cfg.prune.masks_file:
        mf = read_mask_file(cfg.prune.masks_file, model, cfg.model.name if cfg.task.name == "classify" else None)
        return {n: m.to(torch.bool) for n, m in mf.masks.items()}, f"from {cfg.prune.masks_file}"
    if cfg.prune.method == "none" or cfg.prune.sparsity == 0 or estimator_name(cfg) in DENSE_ESTIMATORS:
        return None, "dense"
    names = maskable_names(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    ratios = {n: cfg.prune.sparsity for n in names}
    return layerwise_random_masks(shapes, ratios, cfg.train.seed, 0), \
        f"layer-wise random at sparsity {cfg.prune.sparsity}"


def make_plan(cfg, args) -> dict:
    """Calibrate on this machine and predict the run of ``cfg`` at ``args.ranks`` ranks."""
    from .config import estimator_name
    from .data import epoch_batches
    from .inputs import model_input
    from .runtime import ieee_float32
    from .sharding import balanced_bounds, shard_costs
    from .steps.build import make_engine
    from .steps.protocol import apply_gradient, standard
    from .tasks.loading import build_task
    from .timing import clock_name, timed
    from .trainer import build_optimizer
    from .zo import Coordinates
    from .zo.costs import calibrate
    from .zo.objective import Objective
    from .comm import world

    if estimator_name(cfg) != "cge":
        raise ConfigError(f"config key 'zo.estimator': the planner models sparse CGE runs only, got "
                          f"{estimator_name(cfg)!r}")
    P = args.ranks
    dev = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    ieee_float32()
    try:
        task = build_task(cfg)
        model = task.model.to(dev)
        objective = Objective(task.loss, task.batched_loss, task.name)
        engine, reuse_off = make_engine(model, objective, cfg)
        masks, masks_what = _masks(cfg, model)
        coords = Coordinates(model, masks)
        train_x, train_y = task.train
        n_train = args.train_examples or int(train_x.shape[0])
        batch = min(cfg.data.batch_size, int(train_x.shape[0]))
        idx = epoch_batches(int(train_x.shape[0]), batch, cfg.train.seed, 0)[0]
        x = standard(model_input(train_x[idx], next(model.parameters())))
        y = standard(train_y[idx].to(dev))

        # the cost model, as start-up runs it (CGEStep.calibrate), with a larger budget
        if hasattr(engine, "plans"):
            cal = calibrate(engine, coords, x, y, budget_seconds=args.budget, repeats=REPEATS,
                            statistic=statistics.median)
            costs = cal.costs(engine, coords)
            calib_seconds = cal.seconds
        else:  # full forwards: every query costs one stacked forward of the model, whatever its parameter
            pi = next((i for i, n in enumerate(coords.counts) if n > 0), None)
            if pi is None:
                raise ConfigError("no active coordinates to plan for (every mask is empty)")
            engine.prepare(x, y)
            q = min(engine.batch_size(pi), coords.counts[pi])
            flat = coords.indices(pi)[:q].tolist()
            sec = min(timed(lambda: engine.query(pi, flat, [1e-3] * q), dev)[1] for _ in range(2)) / q
            costs, calib_seconds = [sec] * len(coords.counts), 2 * sec * q
        forward = statistics.median(timed(lambda: engine.prepare(x, y), dev)[1] for _ in range(5))
        feature_bytes = _nbytes(engine.feature_tensors()) if engine.shares_features else 0

        optimizer = build_optimizer(cfg, model, world())
        values = torch.full((coords.total,), 1e-6, dtype=next(model.parameters()).dtype)

        def update():
            with torch.no_grad():
                apply_gradient(optimizer, model, coords, values)
                model.train()
                model(x)

        update()  # optimizer state allocated (momentum buffers), untimed
        update_seconds = statistics.median(timed(update, dev)[1] for _ in range(3))
        memory_mb = peak_memory_mb(dev)
    finally:
        torch.set_num_threads(previous_threads)

    # the step at P ranks
    net = Network(args.bandwidth_gbs * 1e9, args.latency_us * 1e-6)
    central = cfg.zo.difference == "central"
    per_coord = [c * (2 if central else 1) for c in costs]
    granule = engine.query_batch if not central else max(1, engine.query_batch // 2)
    bounds = balanced_bounds(list(coords.counts), per_coord, P, granule)
    loads = shard_costs(bounds, list(coords.counts), per_coord)
    mean = sum(loads) / len(loads)
    imbalance = max(loads) / mean if mean > 0 else 1.0
    batch_bytes = _nbytes([x, y])
    state = [p for p in model.parameters() if p.requires_grad] + [b for b in model.buffers() if b.is_floating_point()]
    state_bytes = _nbytes(state)
    value_bytes = coords.total * next(model.parameters()).element_size()
    features = "recompute"
    if P > 1 and engine.shares_features:
        t_bcast = net.bcast(feature_bytes, P)
        if cfg.zo.features == "broadcast" or (cfg.zo.features == "auto" and t_bcast < forward):
            features = "broadcast"
    worker_start = 0.0 if P == 1 else (net.bcast(feature_bytes, P) if features == "broadcast" else forward)
    compute = max([loads[0]] + [load + worker_start for load in loads[1:]])
    comm_seconds = (net.bcast(batch_bytes, P) + net.bcast(8, P) + net.gather(value_bytes, P)
                    + net.gather(24 * P, P) + net.bcast(24 * P, P) + net.bcast(state_bytes, P))
    step_seconds = forward + compute + comm_seconds + update_seconds + (0 if P == 1 else net.hops(P) * net.latency)
    comm_bytes = (P - 1) * (batch_bytes + 8 + state_bytes + (feature_bytes if features == "broadcast" else 0)) \
        + value_bytes * (P - 1) / P + (P - 1) * 24 * P * 2

    steps_per_epoch = max(1, n_train // batch) if n_train >= batch else 1
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.max_steps:
        total_steps = min(total_steps, cfg.train.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)
    n_test = int(task.test[0].shape[0]) if task.test is not None else 0
    eval_seconds = forward * (n_test / batch) / P if n_test else 0.0
    epoch_seconds = steps_per_epoch * step_seconds + eval_seconds
    run_seconds = calib_seconds + total_steps * step_seconds + epochs * eval_seconds
    return {
        "ranks": P, "device": args.device, "threads_per_rank": args.threads, "clock": clock_name(),
        "model": cfg.model.name if cfg.task.name == "classify" else type(model).__name__,
        "batch": batch, "masks": masks_what, "active_coords": coords.total,
        "feature_reuse": reuse_off is None, "features": features,
        "step_seconds": step_seconds, "epoch_seconds": epoch_seconds, "run_seconds": run_seconds,
        "steps_per_epoch": steps_per_epoch, "total_steps": total_steps, "epochs": epochs,
        "imbalance": imbalance, "comm_bytes_per_step": int(round(comm_bytes)),
        "memory_per_rank_mb": round(memory_mb, 1),
        "breakdown_seconds": {"forward": forward, "shard_compute_max": compute, "comm": comm_seconds,
                              "update": update_seconds, "eval_per_epoch": eval_seconds,
                              "calibration": calib_seconds},
        "network": {"bandwidth_gbs": args.bandwidth_gbs, "latency_us": args.latency_us},
        "bytes": {"features": feature_bytes, "parameters_and_buffers": state_bytes, "batch": batch_bytes,
                  "estimate": value_bytes},
    }


def slurm_header(plan: dict, args) -> list[str]:
    """``#SBATCH`` lines for the run: nodes, tasks, GPUs, a time limit with margin, the signal lead."""
    P = plan["ranks"]
    if args.device == "cuda":
        per_node = min(P, args.ranks_per_node or args.gpus_per_node)
    else:
        per_node = min(P, args.ranks_per_node or P)
    nodes = math.ceil(P / per_node)
    limit = math.ceil((plan["run_seconds"] * args.margin + SIGNAL_LEAD_SECONDS) / 60)
    days, rest = divmod(limit, 24 * 60)
    hours, minutes = divmod(rest, 60)
    time_limit = (f"{days}-" if days else "") + f"{hours:02d}:{minutes:02d}:00"
    lines = [f"# zohpc.plan: {plan['step_seconds']:.3g} s/step, {plan['epoch_seconds'] / 60:.3g} min/epoch, "
             f"run {plan['run_seconds'] / 3600:.3g} h at {P} rank(s); limit = run x {args.margin} + "
             f"{SIGNAL_LEAD_SECONDS} s",
             f"#SBATCH --nodes={nodes}",
             f"#SBATCH --ntasks-per-node={per_node}",
             f"#SBATCH --cpus-per-task={args.threads}"]
    if args.device == "cuda":
        lines.append(f"#SBATCH --gpus-per-node={per_node}")
    lines += [f"#SBATCH --time={time_limit}",
              f"#SBATCH --signal=B:USR1@{SIGNAL_LEAD_SECONDS}",
              "#SBATCH --requeue"]
    return lines


def run(comm, args) -> int:
    from .config import load_config

    comm.one_process_only("zohpc.plan runs as one process (it predicts P ranks from one): start it without mpirun")
    check_args(args)
    cfg = load_config(args.config, args.overrides, None)
    plan = make_plan(cfg, args)
    if args.slurm:
        plan["sbatch"] = slurm_header(plan, args)
    if args.json:
        print(json.dumps(plan))
    elif args.slurm:
        print("\n".join(plan["sbatch"]))
    else:
        for key, value in plan.items():
            print(f"{key:22s} {value}")
    return 0


def main(argv=None) -> None:
    from .comm import run_main

    args = build_parser().parse_args(argv)
    run_main(lambda comm: run(comm, args), "zohpc.plan")


if __name__ == "__main__":
    main()
