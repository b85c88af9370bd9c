"""Shared plumbing of the ZO optimizers: the flat parameter vector, distributed queries, agreed decisions.

A query writes a point into the parameters, calls the closure and reads one float. The
queries of a batch are split over the ranks in contiguous blocks and the loss values are
all-gathered, so every rank ends up with every value and can take the identical step.
Ranks may round differently, so a decision that chooses a collective is the driver's
(rank 0), broadcast (:meth:`QueryRunner.agree`).
"""

from __future__ import annotations

import time

import torch

from ..sharding import contiguous_split
from ..stop import no_check


def trainable(param_groups) -> list[torch.Tensor]:
    """The parameters that require grad, in group order, checked for one dtype and device."""
    params = [p for group in param_groups for p in group["params"] if p.requires_grad]
    if not params:
        raise ValueError("no trainable parameters")
    p0 = params[0]
    for p in params:
        if p.dtype != p0.dtype or p.device != p0.device:
            raise ValueError("all parameters must share one dtype and device")
    return params


def first_trainable_index(param_groups) -> int:
    """Index of the first trainable parameter in ``state_dict()['state']`` numbering."""
    index = 0
    for group in param_groups:
        for p in group["params"]:
            if p.requires_grad:
                return index
            index += 1
    raise ValueError("no trainable parameters")


def flat(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params])


@torch.no_grad()
def write(params, vec: torch.Tensor) -> None:
    offset = 0
    for p in params:
        n = p.numel()
        p.copy_(vec[offset:offset + n].view_as(p))
        offset += n


class QueryRunner:
    """Evaluates batches of points, split over ``comm``'s ranks; times the closure; agrees on decisions."""

    def __init__(self, comm=None):
        self.comm = comm
        self.closure_seconds = 0.0
        self.check = no_check  # the stop check between queries (set by the training step)

    @property
    def ranks(self) -> int:
        return self.comm.size if self.comm is not None else 1

    def agree(self, values) -> list[float]:
        """The driver's ``values`` (small numbers) on every rank: decisions are taken from these."""
        if self.ranks == 1:
            return [float(v) for v in values]
        buf = torch.tensor([float(v) for v in values], dtype=torch.float64)
        self.comm.bcast_(buf)
        return buf.tolist()

    def agree_tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The driver's tensor ``t`` (contiguous) on every rank, in place."""
        if self.ranks > 1:
            self.comm.bcast_(t)
        return t

    def call(self, closure) -> float:
        t0 = time.perf_counter()
        loss = closure()
        self.closure_seconds += time.perf_counter() - t0
        return float(loss.item() if torch.is_tensor(loss) else loss)

    @torch.no_grad()
    def evaluate(self, closure, params, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """float64 losses at the rows of ``points``; the parameters are left at ``x``."""
        k = points.shape[0]
        size = self.ranks
        rank = self.comm.rank if self.comm is not None else 0
        bounds = contiguous_split(k, size)
        counts = [bounds[r + 1] - bounds[r] for r in range(size)]
        start = bounds[rank]

        def work():
            local = torch.empty(counts[rank], dtype=torch.float64)
            try:
                for i in range(counts[rank]):
                    self.check()
                    write(params, points[start + i])
                    local[i] = self.call(closure)
            finally:
                if counts[rank]:
                    write(params, x)
            return local

        if size == 1:
            return work()
        # a stop on any rank is raised on every rank after the collective (all leave together)
        return self.comm.allgatherv_or_abandon(work, counts)
