"""The LIZO step: every rank holds the minibatch and runs the optimizer identically; the
optimizer spreads its loss queries over the ranks and allgathers their values, so every
decision inside it is taken from values all ranks share."""

from __future__ import annotations

import copy
import math
import time

import torch

from ..errors import UserError
from ..stop import StepAbandoned, no_check
from ..zo.batchnorm import batch_stats_only
from .protocol import StepResult, settle, share_batch, share_state


class LIZOStep:
    """One ``optimizer.step(closure)`` of :class:`zohpc.optim.LIZO` on the shared minibatch."""

    name = "lizo"

    def __init__(self, comm, model, optimizer, objective, *, stop=None):
        self.comm, self.model, self.optimizer, self.objective, self.stop = comm, model, optimizer, objective, stop
        self.coords = None
        self.progress = None

    def set_coords(self, coords, costs=None) -> None:
        self.coords = coords  # LIZO searches all parameters (masks do not apply)

    def rebalance(self, compute) -> None:
        """The optimizer splits its queries evenly."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int, apply_update) -> StepResult:
        comm, model, optimizer = self.comm, self.model, self.optimizer
        t0 = time.perf_counter()
        share_batch(comm, x, y)
        # the stop check runs between the optimizer's sharded queries, where every rank
        # leaves together (see zohpc.comm.Comm.allgatherv_or_abandon)
        optimizer.query_check = self.stop.check if self.stop is not None else no_check

        @torch.no_grad()
        def closure():
            with batch_stats_only(model):
                return self.objective(model(x), y, 1)[0]

        # the optimizer mutates its state as it goes: keep the last completed step's state
        saved = ([p.detach().clone() for p in model.parameters()], copy.deepcopy(optimizer.state_dict()))
        q0 = optimizer.num_queries
        loss, abandoned, error = math.nan, False, None
        try:
            loss = float(optimizer.step(closure))
        except StepAbandoned:
            abandoned = True
        except UserError as exc:
            error = str(exc)
        compute = time.perf_counter() - t0
        try:
            every = settle(comm, self.stop, step, compute, abandoned, error)
        except BaseException:
            with torch.no_grad():
                for p, s in zip(model.parameters(), saved[0]):
                    p.copy_(s)
            optimizer.load_state_dict(saved[1])
            raise
        if comm.is_driver:
            apply_update(None, x)  # BatchNorm running statistics (the driver's forward)
        share_state(comm, model)
        return StepResult(loss=loss, queries=int(optimizer.num_queries - q0), compute=every,
                          times={"compute": compute})
