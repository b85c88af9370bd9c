"""The RGE step over MPI: ``q`` random unit directions over the active coordinates, the
directions sharded over the ranks; only loss values travel (every rank regenerates any
direction from (seed, step, j))."""

from __future__ import annotations

import math
import time

import torch

from ..stop import no_check
from ..zo import Coordinates
from ..zo.rge import active_scatter, rge_coefficients, rge_combine, rge_losses
from .protocol import Outcome, StepResult, apply_gradient, attempt, finish, settle, share_batch
from ..sharding import contiguous_split


class RGEStep:
    """``g = (d / q) Σ_j (f(θ + μ u_j) − f(θ)) / μ · u_j`` over the ``d`` active coordinates
    (unit directions; the d-scaling is documented in :mod:`zohpc.zo.rge`); the driver steps
    ``optimizer`` on the estimate."""

    name = "rge"

    def __init__(self, comm, model, evaluator, optimizer=None, *, mu: float, queries: int, seed: int, stop=None):
        self.comm, self.model, self.evaluator, self.optimizer = comm, model, evaluator, optimizer
        self.mu, self.q, self.seed, self.stop = mu, int(queries), int(seed), stop
        self.coords: Coordinates | None = None
        self.scatter = None
        self.bounds: list[int] = []

    def setup(self, coords: Coordinates, sample_batch=None) -> None:
        self.coords = coords
        self.scatter = active_scatter(coords)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing is kept between steps: the directions come from (seed, step, j)."""

    @property
    def queries_per_step(self) -> int:
        return self.q

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        comm = self.comm
        times = {}
        t0 = time.perf_counter()
        share_batch(comm, x, y)
        if not self.bounds:  # blocks of whole stacked passes (the pass size depends on the batch shape)
            self.evaluator.prepare(x, y)
            self.bounds = contiguous_split(self.q, comm.size, max(1, int(self.evaluator.copies_per_pass)))
        lo, hi = self.bounds[comm.rank], self.bounds[comm.rank + 1]
        check = self.stop.check if self.stop is not None else no_check

        def work():
            base = float(self.evaluator.prepare(x, y))  # every rank: the same forward, the same value
            return base, rge_losses(self.evaluator, self.coords.total, (self.seed, step), lo, hi, self.mu,
                                    scatter=self.scatter, check=check)

        outcome = attempt(work)
        base, local = outcome.value or (math.nan, torch.full((hi - lo,), math.nan, dtype=torch.float64))
        times["compute"] = outcome.seconds = time.perf_counter() - t0

        t1 = time.perf_counter()
        losses = comm.gatherv(local.to(torch.float64).contiguous(), [self.bounds[r + 1] - self.bounds[r]
                                                                     for r in range(comm.size)])
        times["gather"] = time.perf_counter() - t1
        compute = settle(comm, self.stop, outcome, f"step {step + 1}")

        t2 = time.perf_counter()

        def update():
            coeffs = rge_coefficients((losses - base) / self.mu, self.coords.total)
            first = next(self.model.parameters())
            apply_gradient(self.optimizer, self.model, self.coords,
                           rge_combine(coeffs, self.coords.total, (self.seed, step), first.dtype, device=first.device))

        finish(comm, self.model, x, update)
        times["update"] = time.perf_counter() - t2
        return StepResult(loss=base, queries=self.q, compute=compute, times=times)
