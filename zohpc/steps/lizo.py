"""The LIZO step: every rank holds the minibatch and runs the optimizer identically; the
optimizer spreads its loss queries over the ranks and allgathers their values, so every
decision inside it is taken from values all ranks share."""

from __future__ import annotations

import copy
import math

import torch

from ..stop import no_check
from ..zo.batchnorm import batch_stats_only
from .protocol import StepResult, attempt, finish, settle, share_batch


class LIZOStep:
    """One ``optimizer.step(closure)`` of :class:`zohpc.optim.LIZO` on the shared minibatch."""

    name = "lizo"

    def __init__(self, comm, model, optimizer, objective, *, stop=None):
        self.comm, self.model, self.optimizer, self.objective, self.stop = comm, model, optimizer, objective, stop
        self.coords = None
        self.queries_per_step = int(getattr(optimizer, "defaults", {}).get("num_sample_per_step", 0))

    def setup(self, coords, sample_batch=None) -> None:
        self.coords = coords  # LIZO searches all parameters (masks do not apply)

    def state_dict(self) -> dict:
        return {}  # the optimizer's state holds everything LIZO keeps

    def load_state_dict(self, state: dict) -> None:
        """Nothing beyond the optimizer's state."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        comm, model, optimizer = self.comm, self.model, self.optimizer
        share_batch(comm, x, y)

        @torch.no_grad()
        def closure():
            with batch_stats_only(model):
                return self.objective(model(x), y, 1)[0]

        # the optimizer mutates its state as it goes: keep the last completed step's state
        saved = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict()))
        q0 = optimizer.num_queries
        # the stop check runs between the optimizer's sharded queries, where every rank
        # leaves together (see zohpc.comm.Comm.allgatherv_or_abandon)
        check = self.stop.check if self.stop is not None else no_check
        outcome = attempt(lambda: float(optimizer.step(closure, check=check)))
        loss = math.nan if outcome.value is None else outcome.value
        try:
            every = settle(comm, self.stop, outcome, f"step {step + 1}")
        except BaseException:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved[0]):
                    p.copy_(s)
            optimizer.load_state_dict(saved[1])
            raise
        finish(comm, model, x)  # BatchNorm running statistics (the driver's forward)
        return StepResult(loss=loss, queries=int(optimizer.num_queries - q0), compute=every,
                          times={"compute": outcome.seconds})
