"""Query costs per parameter from a work model, calibrated by a few timings (start-up in seconds).

Shards are balanced by the cost of one query of each parameter's downstream plan. Timing
every parameter takes minutes on a real model (ResNet-20 at batch 256: the early layers
re-run almost the whole network per query). Instead:

* :func:`plan_flops` counts, from shapes alone, the work of one query of each plan as the
  engine executes it (incremental first layer, one-channel deltas, full ops downstream, the
  objective): 2 x multiply-adds of convs and linears plus ``MOVE_WEIGHT`` per element read or
  written by the other (memory-bound) ops, in FLOP-equivalents;
* :func:`calibrated_costs` times stacked passes of a few representative parameters (most
  expensive, cheapest, median, then quartiles while the budget lasts) and fits
  ``seconds = a * flops + b`` (a, b >= 0), which it evaluates for every parameter.

Measured per-parameter times rank like the model's (Spearman ~0.98 on ResNet-20 and cnn_d5,
see tests/test_costs.py); the step protocol refines the costs with real shard times.
:func:`measured_costs` times every parameter (the slow reference).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ..stop import no_check
from ..timing import now, sync

MOVE_WEIGHT = 16.0  # FLOP-equivalents per element moved by a memory-bound op (fitted on CPU, see module doc)


def plan_flops(engine) -> list[float]:
    """FLOP-equivalents of one query of each parameter (0 where no query reaches the loss).

    Needs a prepared engine (the work depends on the input shape).
    """
    return [float(p.flops + MOVE_WEIGHT * p.moves) for p in engine.work()]


def _sample_flat(coords, pi: int, size: int) -> list:
    """``size`` active flat indices of parameter ``pi``, spread over the tensor."""
    idx = coords.indices(pi)
    pick = torch.linspace(0, idx.numel() - 1, size).round().long()
    return idx[pick].tolist()


def time_pass(engine, coords, pi: int, repeats: int = 1, check=no_check, max_seconds: float = math.inf,
              statistic=min) -> float:
    """Seconds per query of parameter ``pi``: min over up to ``repeats`` full stacked passes.

    Timed on :func:`zohpc.timing.now` (``ZOHPC_CLOCK``), the device synchronized around each pass.
    ``statistic``: of the passes' times (``min``: the machine's best; ``statistics.median``:
    its typical time when other jobs share it).

    A pass stacks ``engine.batch_size(pi)`` active coordinates, as a real step does. Stops
    repeating once ``max_seconds`` are spent; calls ``check()`` before each pass.
    """
    Q = min(engine.batch_size(pi), coords.counts[pi])
    flat = _sample_flat(coords, pi, Q)
    dev = engine.params[pi].device
    times, spent = [], 0.0
    for _ in range(max(1, repeats)):
        check()
        sync(dev)
        t0 = now()
        engine.query(pi, flat, [1e-3] * Q)
        sync(dev)
        dt = now() - t0
        times.append(dt)
        spent += dt
        if spent >= max_seconds:
            break
    return statistic(times) / Q


@dataclass
class Calibration:
    """The fit ``seconds per query = a * flops + b`` and the timings it came from."""

    a: float
    b: float
    samples: list = field(default_factory=list)  # (param index, flops, measured seconds per query)
    seconds: float = 0.0  # wall time of the calibration (timings and fit)

    def costs(self, engine, coords) -> list[float]:
        """Predicted seconds per query of every parameter with active coordinates, 0 elsewhere."""
        return [self.a * f + self.b if n > 0 else 0.0 for f, n in zip(plan_flops(engine), coords.counts)]


def _fit(points) -> tuple[float, float]:
    """Non-negative ``a``, ``b`` minimising the relative error of ``a * flops + b`` over (flops, seconds)."""
    xs = torch.tensor([[f, 1.0] for f, _ in points], dtype=torch.float64)
    ts = torch.tensor([t for _, t in points], dtype=torch.float64)
    w = 1.0 / ts.clamp_min(1e-12)  # relative error: cheap and expensive plans count alike
    best = None
    # the optimum of a 2-variable non-negative least squares is the unconstrained one or lies
    # on an axis: try all three and keep the best feasible
    A, t = xs * w[:, None], ts * w
    cands = [tuple(torch.linalg.lstsq(A, t[:, None]).solution.reshape(-1).tolist())]
    fx = A[:, 0] @ A[:, 0]
    cands.append((float(A[:, 0] @ t / fx) if fx > 0 else 0.0, 0.0))
    cands.append((0.0, float(A[:, 1] @ t / (A[:, 1] @ A[:, 1]))))
    for a, b in cands:
        if a < 0 or b < 0:
            continue
        err = float(((A[:, 0] * a + A[:, 1] * b - t) ** 2).sum())
        if best is None or err < best[0]:
            best = (err, a, b)
    return best[1], best[2]


def _sample_order(active: list, flops: list) -> list:
    """Parameters to time, most informative first: most expensive, cheapest, median, quartiles, ..."""
    ranked = sorted(active, key=lambda pi: (flops[pi], pi))
    n = len(ranked)
    order, seen = [], set()
    for frac in (1.0, 0.0, 0.5, 0.25, 0.75, 0.125, 0.375, 0.625, 0.875):
        pi = ranked[round(frac * (n - 1))]
        if pi not in seen:
            seen.add(pi)
            order.append(pi)
    return order


def calibrate(engine, coords, x=None, y=None, budget_seconds: float = 2.0, check=no_check,
              repeats: int = 3, statistic=min) -> Calibration:
    """Time a few representative parameters and fit seconds per query against :func:`plan_flops`.

    ``x``, ``y``: a minibatch of the real shape (the engine is prepared on it); None: use the
    engine's current minibatch. The most expensive, the cheapest and the median parameter are
    always timed (one pass each at least); others while the budget lasts (a sample is skipped
    when the fit so far predicts it would overrun). ``check()`` is called between timings.
    ``repeats``, ``statistic``: passes per sample and what counts of their times (start-up:
    the fastest of 3; ``python -m zohpc.plan``: the median of 10).
    """
    t_start = time.perf_counter()
    engine.check_coords(coords)
    if x is not None:
        engine.prepare(x, y)
    check()
    flops = plan_flops(engine)
    active = [pi for pi, n in enumerate(coords.counts) if n > 0]
    if not active:
        return Calibration(0.0, 0.0, [], time.perf_counter() - t_start)
    order = _sample_order(active, flops)
    # warm-up: one pass of the cheapest plan (allocator, kernel caches), untimed
    time_pass(engine, coords, order[1] if len(order) > 1 else order[0], check=check)
    share = budget_seconds / min(len(order), 5)
    samples = []
    for k, pi in enumerate(order):
        left = budget_seconds - (time.perf_counter() - t_start)
        if k >= 3 and left <= 0:
            break
        if k >= 3:
            a, b = _fit([(f, s) for _, f, s in samples])
            guess = (a * flops[pi] + b) * min(engine.batch_size(pi), coords.counts[pi])
            if guess > left:
                continue
        sec = time_pass(engine, coords, pi, repeats=repeats, check=check, max_seconds=min(share, max(left, 0.0)),
                        statistic=statistic)
        samples.append((pi, flops[pi], sec))
    a, b = _fit([(f, s) for _, f, s in samples])
    return Calibration(a, b, samples, time.perf_counter() - t_start)


def calibrated_costs(engine, coords, x=None, y=None, budget_seconds: float = 2.0, check=no_check) -> list[float]:
    """Seconds per query of each parameter (0 for parameters without active coordinates).

    From :func:`calibrate`: a few seconds at most, whatever the model. Ranks time on their own
    machine; average the lists over ranks (allreduce) so that every rank shards alike.
    """
    return calibrate(engine, coords, x, y, budget_seconds, check).costs(engine, coords)


def measured_costs(engine, coords, x, y, repeats: int = 2, only=None, check=no_check) -> list[float]:
    """Seconds per query of each parameter, each timed (the slow reference; minutes on ResNet-20).

    ``only``: indices of the parameters to time (others get 0.0), so that ranks can split the
    measurement and sum their results. Parameters without active coordinates get 0.0.
    """
    engine.check_coords(coords)
    engine.prepare(x, y)
    wanted = set(range(len(engine.params)) if only is None else only)
    return [time_pass(engine, coords, pi, repeats, check) if pi in wanted and coords.counts[pi] > 0 else 0.0
            for pi in range(len(engine.params))]


__all__ = ["MOVE_WEIGHT", "Calibration", "calibrate", "calibrated_costs", "measured_costs", "plan_flops",
           "time_pass"]
