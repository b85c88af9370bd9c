"""What every step of every estimator shares: the minibatch, the end-of-step agreement and
the parameters, each one collective (DESIGN.md, "One training step over MPI").

An estimator's step (``zohpc.steps.cge``, ``.rge``, ``.lizo``) reads top to bottom:

1. :func:`share_batch`: the driver's minibatch on every rank (Bcast);
2. this rank's queries, stoppable between groups (``StepAbandoned``) and with the task's
   errors caught, so that every rank always reaches the same collectives;
3. the values gathered (Gatherv, estimator-specific);
4. :func:`settle`: one allgather of (compute seconds, abandoned, failed) per rank; a stop
   or an abandoned step raises :class:`~zohpc.stop.Preempted` on every rank, a task error
   an agreed UserError naming the step: nothing of the step has been applied yet;
5. the driver steps the optimizer; :func:`share_state` broadcasts parameters and buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..stop import Preempted


@dataclass
class StepResult:
    """What one completed step reports (identical on every rank except ``times``)."""

    loss: float
    queries: int
    compute: list[float]  # per rank: seconds of query work this step
    times: dict = field(default_factory=dict)  # this rank's phases


def share_batch(comm, x: torch.Tensor, y: torch.Tensor) -> None:
    """Broadcast the driver's minibatch in place; every rank passes tensors of the same shape
    and dtype (its own draw of the same batch), in standard strides (same kernels everywhere)."""
    if comm.size > 1:
        comm.bcast_(x)
        comm.bcast_(y)


def standard(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def settle(comm, stop, step: int, compute: float, abandoned: bool, error: str | None) -> list[float]:
    """End-of-step agreement (one allgather); returns every rank's compute seconds.

    Raises Preempted on every rank if any rank abandoned the step or was asked to stop,
    and the first failing rank's message as an agreed UserError if the task failed.
    """
    requested = abandoned or (stop is not None and stop.requested)
    local = torch.tensor([float(compute), 1.0 if requested else 0.0, 1.0 if error else 0.0], dtype=torch.float64)
    every = comm.allgatherv(local, [3] * comm.size).view(comm.size, 3)
    if bool((every[:, 2] > 0).any()):
        comm.raise_if_any(f"{error} (step {step + 1})" if error else None)
    if bool((every[:, 1] > 0).any()):
        raise Preempted()
    return every[:, 0].tolist()


@torch.no_grad()
def share_state(comm, model: torch.nn.Module, frozen: bool = False) -> None:
    """Broadcast the driver's trainable parameters and floating-point buffers (BatchNorm
    running statistics) as one flat vector, so every replica is identical. Frozen parameters
    never change after start-up: ``frozen=True`` (start-up, resume) sends them too."""
    if comm.size == 1:
        return
    tensors = [p for p in model.parameters() if frozen or p.requires_grad]
    tensors += [b for b in model.buffers() if b.is_floating_point()]
    flat = parameters_to_vector(tensors).detach().contiguous()
    comm.bcast_(flat)
    if not comm.is_driver:
        vector_to_parameters(flat, tensors)
