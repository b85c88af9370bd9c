"""The SPSA step over MPI at inference-level memory: each rank evaluates its share of the
``q`` directions (and the base loss), only the float64 loss values travel (one
Allgatherv), and every rank regenerates every ``z_j`` and applies the same update, so the
replicas stay identical with no parameter broadcast. A checksum allreduce every
``check_every`` steps verifies that (see :mod:`zohpc.zo.spsa` and :class:`zohpc.optim.SPSA`)."""

from __future__ import annotations

import math
import time

import torch

from ..errors import UserError
from ..stop import no_check
from ..zo.batchnorm import batch_stats_only
from ..zo.spsa import checksum
from .protocol import StepResult, attempt, finish, has_running_stats, settle, share_batch

CHECK_EVERY = 50  # steps between replica checks (one allreduce of two float64 values)


class ReplicaMismatch(UserError):
    """The replicas' parameters differ (a non-deterministic kernel or a broken rank)."""


class SPSAStep:
    """One :class:`zohpc.optim.SPSA` step on the shared minibatch; the stop/agreement point
    lies between the queries and the update, so a stopped step leaves the parameters as they
    were (they are never written during the queries)."""

    name = "spsa"

    def __init__(self, comm, model, optimizer, objective, *, stop=None, check_every: int = CHECK_EVERY):
        self.comm, self.model, self.optimizer, self.objective, self.stop = comm, model, optimizer, objective, stop
        self.check_every = int(check_every)
        self.queries_per_step = len(optimizer.tasks())
        self.running_stats = has_running_stats(model)

    def setup(self, coords, sample_batch=None) -> None:
        """SPSA perturbs every trainable parameter (masks do not apply)."""

    def state_dict(self) -> dict:
        return {}  # the optimizer's state (step counter, momentum) holds everything SPSA keeps

    def load_state_dict(self, state: dict) -> None:
        """Nothing beyond the optimizer's state."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        comm, model, opt = self.comm, self.model, self.optimizer
        t0 = time.perf_counter()
        share_batch(comm, x, y)

        def closure():
            with batch_stats_only(model):
                return self.objective(model(x), y, 1)[0]

        check = self.stop.check if self.stop is not None else no_check
        outcome = attempt(lambda: opt.losses(closure, check))  # every rank ends with every value
        compute = settle(comm, self.stop, outcome, f"step {step + 1}")
        losses = outcome.value
        if not bool(torch.isfinite(losses).all()):  # the same values on every rank: an agreed error
            raise UserError(f"task '{self.objective.name}': loss is not finite in an SPSA query (step {step + 1})")
        t1 = time.perf_counter()
        loss = opt.apply(losses)
        if self.running_stats:
            finish(comm, model, x)
        if self.check_every and comm.size > 1 and opt.step_index % self.check_every == 0:
            self.check_replicas(step)
        times = {"compute": t1 - t0, "update": time.perf_counter() - t1}
        return StepResult(loss=loss if math.isfinite(loss) else math.nan, queries=losses.numel(), compute=compute,
                          times=times)

    def check_replicas(self, step: int) -> None:
        """Every rank's parameter checksum equals the driver's, or an agreed error."""
        local = checksum(self.optimizer.params)
        every = self.comm.allgatherv(local, [2] * self.comm.size).view(self.comm.size, 2)
        if not bool((every == every[0]).all()):
            raise ReplicaMismatch(f"SPSA replicas differ after step {step + 1} (parameter checksums "
                                  f"{every[:, 0].tolist()}); the model's forward is not deterministic across ranks")
