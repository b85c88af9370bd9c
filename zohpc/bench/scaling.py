"""``mpirun -n K python -m zohpc.bench scaling --model resnet20 --batch 64 --sparsity 0.9 --steps S --json``

Times the distributed sparse-CGE step exactly as training runs it (driver forward,
broadcasts, shard compute on every rank, Gatherv, optimizer step, parameter broadcast) on
synthetic CIFAR-shaped data, and reports the per-phase breakdown, the load imbalance
(max/mean shard compute) and the communication + driver-only fraction of the step.
Run it with K = 1, 2, ... and compare ``step_seconds`` for the speedup.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..distributed import DistributedCGE, choose_features_mode
from ..masks import layerwise_random_masks, maskable_names
from ..models import MODEL_NAMES, build_model
from ..zo import Coordinates, QueryEngine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench scaling", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="resnet20", choices=MODEL_NAMES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=2, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps first (cost measurement already warms up)")
    p.add_argument("--input", default=None, help="input shape CxHxW (default 3x32x32; 1x8x8 for digits_cnn)")
    p.add_argument("--query-batch", type=int, default=32)
    p.add_argument("--features", default="auto", choices=("auto", "broadcast", "recompute"))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def run(comm, args) -> int:
    threads = comm.set_threads()
    shape = tuple(int(v) for v in (args.input or ("1x8x8" if args.model == "digits_cnn" else "3x32x32")).split("x"))
    torch.manual_seed(0)
    model = build_model(args.model, shape, 10)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, *shape, generator=gen)
    y = torch.randint(0, 10, (args.batch,), generator=gen)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in maskable_names(model)}
    masks = None
    if args.sparsity > 0:
        masks = layerwise_random_masks(shapes, {n: args.sparsity for n in maskable_names(model)}, 0, 0)
    coords = Coordinates(model, masks)
    engine = QueryEngine(model, query_batch=args.query_batch)
    proto = DistributedCGE(comm, model, engine, mu=5e-3)
    proto.separate_wait = True
    t0 = time.perf_counter()
    costs = proto.measure_costs(coords, x, y)
    measure_seconds = time.perf_counter() - t0
    proto.set_coords(coords, costs)
    proto.features = choose_features_mode(comm, engine, x, y) if args.features == "auto" else args.features
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    rows = []
    for step in range(args.warmup + args.steps):
        comm.barrier()
        t_step = time.perf_counter()
        values, base, times = proto.gradient(x if comm.is_driver else None, y if comm.is_driver else None, x.shape)
        if comm.is_driver:
            t1 = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            coords.fill_grad(model, values)
            optimizer.step()
            with torch.no_grad():
                model(x)  # running statistics, as in training
            times.optimizer = time.perf_counter() - t1
        times.param_bcast = proto.share_parameters()
        proto.rebalance(times.compute)  # as training does after its first steps
        step_seconds = comm.allreduce_max(time.perf_counter() - t_step)
        row = [times.driver_forward, times.bcast, times.compute, times.gather, times.optimizer,
               times.param_bcast, step_seconds, times.extra.get("wait", 0.0)]
        table = comm.gather_floats(row)
        if step >= args.warmup and comm.is_driver:
            rows.append(table)
    if not comm.is_driver:
        return 0
    data = torch.stack(rows)  # (steps, ranks, 8)
    mean = data.mean(0)  # per rank, per phase
    compute = mean[:, 2]
    step_seconds = float(mean[0, 6])
    driver = mean[0]
    comm_seconds = float(driver[1] + driver[3] + driver[5])
    driver_only = float(driver[0] + driver[4])
    result = {
        "bench": "scaling",
        "model": args.model,
        "batch": args.batch,
        "sparsity": args.sparsity,
        "ranks": comm.size,
        "threads_per_rank": threads,
        "features": proto.features,
        "active_coords": coords.total,
        "steps": args.steps,
        "step_seconds": step_seconds,
        "driver_forward_seconds": float(driver[0]),
        "bcast_seconds": float(driver[1]),
        "gather_seconds": float(driver[3]),
        "driver_wait_seconds": float(driver[7]),
        "optimizer_seconds": float(driver[4]),
        "param_bcast_seconds": float(driver[5]),
        "compute_seconds": {"min": float(compute.min()), "mean": float(compute.mean()), "max": float(compute.max()),
                            "per_rank": [round(float(v), 4) for v in compute]},
        "imbalance": float(compute.max() / compute.mean()),
        "predicted_imbalance": proto.predicted_imbalance(),
        "comm_fraction": (comm_seconds + driver_only) / step_seconds,
        "comm_seconds": comm_seconds,
        "driver_only_seconds": driver_only,
        "queries_per_s": proto.queries_per_step / step_seconds,
        "cost_measurement_seconds": measure_seconds,
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24s} {v}")
    return 0
