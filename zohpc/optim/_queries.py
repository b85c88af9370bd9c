"""Shared plumbing of the ZO optimizers: the flat parameter vector and distributed queries.

A query writes a point into the parameters, calls the closure and reads one float. The
queries of a batch are split over the ranks in contiguous blocks and the loss values are
all-gathered, so every rank ends up with every value and can take the identical step.
"""

from __future__ import annotations

import time

import torch


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


def block_counts(k: int, size: int) -> list[int]:
    """Contiguous split of ``k`` queries over ``size`` ranks (the first ranks take the remainder)."""
    return [k // size + (1 if r < k % size else 0) for r in range(size)]


class QueryRunner:
    """Evaluates batches of points, split over ``comm``'s ranks; times the closure."""

    def __init__(self, comm=None):
        self.comm = comm
        self.closure_seconds = 0.0

    def call(self, closure) -> float:
        t0 = time.perf_counter()
        loss = closure()
        self.closure_seconds += time.perf_counter() - t0
        return float(loss.item() if torch.is_tensor(loss) else loss)

    @torch.no_grad()
    def evaluate(self, closure, params, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """float64 losses at the rows of ``points``; the parameters are left at ``x``."""
        k = points.shape[0]
        size = self.comm.size if self.comm is not None else 1
        rank = self.comm.rank if self.comm is not None else 0
        counts = block_counts(k, size)
        start = sum(counts[:rank])
        local = torch.empty(counts[rank], dtype=torch.float64)
        for i in range(counts[rank]):
            write(params, points[start + i])
            local[i] = self.call(closure)
        if counts[rank]:
            write(params, x)
        if size == 1:
            return local
        return self.comm.allgatherv(local, counts)
