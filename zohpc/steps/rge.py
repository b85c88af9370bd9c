"""The RGE step over MPI: ``q`` random unit directions over the active coordinates, the
directions sharded over the ranks; only loss values travel (every rank regenerates any
direction from (seed, step, j))."""

from __future__ import annotations

import math
import time

import torch

from ..errors import UserError
from ..stop import StepAbandoned
from ..zo import Coordinates
from ..zo.rge import active_scatter, rge_coefficients, rge_combine, rge_losses
from .protocol import StepResult, settle, share_batch, share_state
from ..sharding import contiguous_split


class RGEStep:
    """``g = (d / q) Σ_j (f(θ + μ u_j) − f(θ)) / μ · u_j`` over the ``d`` active coordinates
    (unit directions; the d-scaling is documented in :mod:`zohpc.zo.rge`)."""

    name = "rge"

    def __init__(self, comm, model, evaluator, *, mu: float, queries: int, seed: int, stop=None):
        self.comm, self.model, self.evaluator = comm, model, evaluator
        self.mu, self.q, self.seed, self.stop = mu, int(queries), int(seed), stop
        self.coords: Coordinates | None = None
        self.scatter = None
        self.bounds: list[int] = []
        self.progress = None

    def set_coords(self, coords: Coordinates, costs=None) -> None:
        self.coords = coords
        self.scatter = active_scatter(coords)

    def rebalance(self, compute) -> None:
        """Directions cost the same: the even split needs no correction."""

    @property
    def queries_per_step(self) -> int:
        return self.q

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, apply_update) -> StepResult:
        comm = self.comm
        times = {}
        t0 = time.perf_counter()
        share_batch(comm, x, y)
        if not self.bounds:  # blocks of whole stacked passes (the pass size depends on the batch shape)
            self.evaluator.prepare(x, y)
            self.bounds = contiguous_split(self.q, comm.size, max(1, int(self.evaluator.copies_per_pass)))
        lo, hi = self.bounds[comm.rank], self.bounds[comm.rank + 1]
        local = torch.full((hi - lo,), math.nan, dtype=torch.float64)
        base = math.nan
        abandoned, error = False, None
        check = self.stop.check if self.stop is not None else (lambda: None)
        try:
            base = float(self.evaluator.prepare(x, y))  # every rank: the same forward, the same value
            local = rge_losses(self.evaluator, self.coords.total, (self.seed, step), lo, hi, self.mu,
                               scatter=self.scatter, check=check)
        except StepAbandoned:
            abandoned = True
        except UserError as exc:
            error = str(exc)
        times["compute"] = time.perf_counter() - t0

        t1 = time.perf_counter()
        losses = comm.gatherv(local.to(torch.float64).contiguous(), [self.bounds[r + 1] - self.bounds[r]
                                                                     for r in range(comm.size)])
        times["gather"] = time.perf_counter() - t1
        compute = settle(comm, self.stop, step, times["compute"], abandoned, error)

        t2 = time.perf_counter()
        if comm.is_driver:
            coeffs = rge_coefficients((losses - base) / self.mu, self.coords.total)
            dtype = next(self.model.parameters()).dtype
            apply_update(rge_combine(coeffs, self.coords.total, (self.seed, step), dtype), x)
        share_state(comm, self.model)
        times["update"] = time.perf_counter() - t2
        return StepResult(loss=base, queries=self.q, compute=compute, times=times)
