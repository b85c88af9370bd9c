"""``mpirun -n K python -m zohpc.bench scaling --model resnet20 --batch 64 --sparsity 0.9 --steps S --json``

Times the distributed sparse-CGE step through the SAME step object training uses
(:class:`zohpc.steps.CGEStep`: batch broadcast, driver forward, shard compute on every
rank, Gatherv, end-of-step agreement, optimizer step, parameter broadcast) on synthetic
CIFAR-shaped data, and reports the per-phase breakdown, the load imbalance (max/mean
shard compute), the start-up cost model's time, and the cost of answering stop signals
(steps with the stop check installed vs without).
Run it with K = 1, 2, ... and compare ``step_seconds`` for the speedup. ``step_cpu_seconds``:
the most process CPU time any rank spent in a step (MPI waits spin, so it counts them): on a
machine shared with other jobs it stays what an idle machine's wall time would be, and with
``ZOHPC_CLOCK=cpu`` the cost model is calibrated on the same clock (``python -m zohpc.plan``
checks its predictions against it).
"""

from __future__ import annotations

import argparse
import time

import torch

from ..masks import layerwise_random_masks, maskable_names
from ..models import MODEL_NAMES, build_model
from ..runtime import setup_runtime
from ..steps import CGEStep
from ..steps.cge import choose_features_mode
from ..stop import StopRequest
from ..zo import Coordinates, QueryEngine
from ..timing import clock_name
from ..zo.costs import calibrated_costs
from .report import emit


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench scaling", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="resnet20", choices=MODEL_NAMES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=2, help="measured steps (each with and without the stop check)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first")
    p.add_argument("--input", default=None, help="input shape CxHxW (default 3x32x32; 1x8x8 for digits_cnn)")
    p.add_argument("--query-batch", type=int, default=32)
    p.add_argument("--features", default="auto", choices=("auto", "broadcast", "recompute"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(comm, args) -> int:
    runtime = setup_runtime(comm, "auto")
    shape = tuple(int(v) for v in (args.input or ("1x8x8" if args.model == "digits_cnn" else "3x32x32")).split("x"))
    torch.manual_seed(0)
    model = build_model(args.model, shape, 10).to(runtime.device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *shape, generator=gen).to(runtime.device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(runtime.device)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in maskable_names(model)}
    masks = None
    if args.sparsity > 0:
        masks = layerwise_random_masks(shapes, {n: args.sparsity for n in maskable_names(model)}, 0, 0)
    coords = Coordinates(model, masks)
    engine = QueryEngine(model, query_batch=args.query_batch)
    stop = StopRequest(comm)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    step_fn = CGEStep(comm, model, engine, optimizer, mu=5e-3)
    t0 = time.perf_counter()
    costs = torch.tensor(calibrated_costs(engine, coords, x, y), dtype=torch.float64)
    comm.allreduce_sum_(costs)
    cost_model_seconds = comm.allreduce_max(time.perf_counter() - t0)
    step_fn.set_coords(coords, (costs / comm.size).tolist())
    step_fn.features = choose_features_mode(comm, engine, x, y) if args.features == "auto" else args.features
    step_fn.rebalances_left = 2  # as training does after its first steps

    rows = {False: [], True: []}
    for i in range(args.warmup + 2 * args.steps):
        checked = i >= args.warmup and (i - args.warmup) % 2 == 1  # alternate: no check, check
        step_fn.stop = stop if checked else None
        comm.barrier()
        t_step, c_step = time.perf_counter(), time.process_time()
        result = step_fn(x.clone(), y.clone(), i)
        step_cpu = comm.allreduce_max(time.process_time() - c_step)
        step_seconds = comm.allreduce_max(time.perf_counter() - t_step)
        t = result.times
        row = torch.tensor([t["forward"], t["compute"], t["gather"], t["update"], step_seconds, step_cpu],
                           dtype=torch.float64)
        table = comm.gatherv(row, [6] * comm.size)
        if i >= args.warmup and comm.is_driver:
            rows[checked].append(table.view(comm.size, 6))
    if not comm.is_driver:
        return 0
    data = torch.stack(rows[False] + rows[True])  # (steps, ranks, 5)
    mean = data.mean(0)
    compute = mean[:, 1]
    step_seconds = float(mean[0, 4])
    plain = float(torch.stack(rows[False])[:, 0, 4].mean())
    checked = float(torch.stack(rows[True])[:, 0, 4].mean())
    result = {
        "bench": "scaling",
        "model": args.model,
        "batch": args.batch,
        "sparsity": args.sparsity,
        "ranks": comm.size,
        "threads_per_rank": runtime.threads,
        "device": str(runtime.device),
        "features": step_fn.features,
        "active_coords": coords.total,
        "steps": 2 * args.steps,
        "step_seconds": step_seconds,
        "step_cpu_seconds": float(mean[0, 5]),
        "forward_seconds": float(mean[0, 0]),
        "gather_seconds": float(mean[0, 2]),
        "update_seconds": float(mean[0, 3]),
        "compute_seconds": {"min": float(compute.min()), "mean": float(compute.mean()), "max": float(compute.max()),
                            "per_rank": [round(float(v), 4) for v in compute]},
        "imbalance": float(compute.max() / compute.mean()),
        "predicted_imbalance": step_fn.predicted_imbalance(),
        "queries_per_s": step_fn.queries_per_step / step_seconds,
        "cost_model_seconds": cost_model_seconds,
        "clock": clock_name(),
        "stop_check": {"step_seconds_without": plain, "step_seconds_with": checked,
                       "ratio": checked / plain},
    }
    emit(result, args.json)
    return 0
