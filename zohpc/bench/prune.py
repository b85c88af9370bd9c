"""``mpiexec -n K python -m zohpc.bench prune --model resnet20 --shape 3,32,32 --classes 10``

ZO-GraSP against its FLOP floor. ZO-GraSP costs ``2 q`` perturbed full forwards of the
pruning batch (``classes x samples_per_class`` examples; 384 forwards of 250 samples for the
paper's q = 192 on CIFAR-10), split over the K ranks. The floor is what those forwards cost
at the speed of ONE plain batched forward of the pruning batch on this rank (best of
``--repeats``, batch statistics, same threads)::

    floor_seconds = (2 q / K) * plain_forward_seconds

``ratio = zo_grasp_seconds / floor_seconds`` (rank 0's floor; ZO-GraSP wall time is the
slowest rank's): everything ZO-GraSP adds (direction generation, the two unperturbed
passes, combination, collectives, imbalance) shows here. Printed as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ..errors import ConfigError
from ..models import MODEL_NAMES, build_model
from ..prune import zo_grasp_hg
from ..zo.batchnorm import batch_stats_only
from ..zo.stacked import StackedForward


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench prune", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet20", choices=MODEL_NAMES)
    p.add_argument("--shape", default="3,32,32", help="input shape C,H,W")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--samples-per-class", type=int, default=25)
    p.add_argument("--queries", type=int, default=192, help="RGE directions q")
    p.add_argument("--mu", type=float, default=5e-3)
    p.add_argument("--query-batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3, help="plain forwards timed for the floor (best of)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _shape(text: str) -> tuple:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(","))
    except ValueError:
        raise ConfigError(f"--shape {text!r}: expected integers like 3,32,32") from None
    if not shape or min(shape) < 1:
        raise ConfigError(f"--shape {text!r}: sizes must be >= 1")
    return shape


def run(comm, args) -> int:
    shape = _shape(args.shape)
    threads = comm.set_threads()
    torch.manual_seed(args.seed)
    model = build_model(args.model, shape, args.classes)
    gen = torch.Generator().manual_seed(args.seed)
    n = args.classes * args.samples_per_class
    x = torch.randn(n, *shape, generator=gen)
    y = torch.arange(args.classes).repeat_interleave(args.samples_per_class)

    best = float("inf")
    with torch.no_grad(), batch_stats_only(model):
        model(x)  # warm-up
        for _ in range(max(1, args.repeats)):
            t0 = time.perf_counter()
            model(x)
            best = min(best, time.perf_counter() - t0)
    forwards = 2 * args.queries
    floor = forwards / comm.size * best

    probe = StackedForward(model, query_batch=args.query_batch)
    probe.prepare(x, y)
    comm.barrier()
    t0 = time.perf_counter()
    zo_grasp_hg(model, x, y, args.queries, args.mu, args.seed, comm, query_batch=args.query_batch)
    seconds = comm.allreduce_max(time.perf_counter() - t0)
    slowest_forward = comm.allreduce_max(best)
    if comm.is_driver:
        print(json.dumps({
            "bench": "prune", "model": args.model, "shape": list(shape), "classes": args.classes,
            "samples": n, "queries": args.queries, "forwards": forwards, "ranks": comm.size,
            "threads_per_rank": threads, "query_batch": args.query_batch,
            "stacking": probe.stacking, "stacking_reason": probe.reason, "copies_per_pass": probe.copies_per_pass,
            "plain_forward_seconds": best, "slowest_rank_plain_forward_seconds": slowest_forward,
            "floor_seconds": floor, "zo_grasp_seconds": seconds, "ratio": seconds / floor,
        }), flush=True)
    return 0
