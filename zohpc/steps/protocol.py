"""The step contract and what every step of every estimator shares: the minibatch, the
end-of-step agreement, the update and the parameters (DESIGN.md, "One training step over MPI").

A step object (``zohpc.steps.cge``, ``.rge``, ``.lizo``, ``.spsa``) implements :class:`Step`
and is built by :func:`zohpc.steps.build_step` from ``zo.estimator``. Its ``__call__`` reads
top to bottom:

1. :func:`share_batch`: the driver's minibatch on every rank (Bcast);
2. this rank's queries inside :func:`attempt`, stoppable between groups (``StepAbandoned``)
   and with the task's errors caught, so that every rank always reaches the same collectives;
3. the values gathered (estimator-specific);
4. :func:`settle` on the :class:`Outcome`: one allgather of (seconds, abandoned, failed) per
   rank; a stop or an abandoned step raises :class:`~zohpc.stop.Preempted` on every rank, a
   task error an agreed UserError naming where: nothing of the step has been applied yet;
5. the update, inside the step: :func:`finish` (the driver steps the optimizer, one
   train-mode forward updates BatchNorm statistics, :func:`share_state` broadcasts), or
   every rank applies the same update (SPSA) and no parameter travels.

The same Outcome/settle pair guards the other stoppable collective work (evaluation, the
cost model, pruning at initialization).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..errors import UserError, describe
from ..stop import Preempted, StepAbandoned


@dataclass
class StepResult:
    """What one completed step reports (identical on every rank except ``times``)."""

    loss: float
    queries: int
    compute: list[float]  # per rank: seconds of query work this step
    times: dict = field(default_factory=dict)  # this rank's phases
    free_queries: int = 0  # coordinates answered without a query (exact: absent tokens' embedding rows)


@runtime_checkable
class Step(Protocol):
    """One estimator's training step over MPI (every rank calls every method alike)."""

    name: str
    queries_per_step: int

    def setup(self, coords, sample_batch) -> None:
        """New active coordinates (a mask draw); ``sample_batch``: ``(x, y)``, a real
        minibatch for start-up measurements (CGE: cost calibration, feature mode, shards)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        """The whole step at global step ``step``, the update included; replicas identical after."""

    def state_dict(self) -> dict:
        """What the step keeps between steps (checkpointed)."""

    def load_state_dict(self, state: dict) -> None:
        ...


@dataclass
class Outcome:
    """How a piece of stoppable work ended on this rank: its value, or abandoned by a stop
    check, or the task's error message; ``seconds`` it took."""

    value: Any = None
    abandoned: bool = False
    error: str | None = None
    seconds: float = 0.0


def attempt(fn, where: str = "") -> Outcome:
    """Run ``fn()`` (collective-free, or whose collectives raise StepAbandoned on every rank
    alike) and record how it ended; ``where`` is appended to a task error's message."""
    t0 = time.perf_counter()
    try:
        out = Outcome(value=fn())
    except StepAbandoned:
        out = Outcome(abandoned=True)
    except UserError as exc:
        out = Outcome(error=f"{exc}{where}")
    except SystemExit as exc:  # the task's own code (its model's forward) gave up: on one rank it would hang the rest
        out = Outcome(error=f"the task's code called {describe(exc)}{where}")
    out.seconds = time.perf_counter() - t0
    return out


def share_batch(comm, x: torch.Tensor, y: torch.Tensor) -> None:
    """Broadcast the driver's minibatch in place; every rank passes tensors of the same shape
    and dtype (its own draw of the same batch), in standard strides (same kernels everywhere)."""
    if comm.size > 1:
        comm.bcast_(x)
        comm.bcast_(y)


def standard(t: torch.Tensor) -> torch.Tensor:
    return t.clone(memory_format=torch.contiguous_format)


def settle(comm, stop, outcome: Outcome, where: str | None = None) -> list[float]:
    """End-of-work agreement (one allgather); returns every rank's ``outcome.seconds``.

    Raises Preempted on every rank if any rank abandoned the work or was asked to stop,
    and the first failing rank's message as an agreed UserError if the task failed
    (`` (where)`` appended when given).
    """
    requested = outcome.abandoned or (stop is not None and stop.requested)
    error = outcome.error
    local = torch.tensor([float(outcome.seconds), 1.0 if requested else 0.0, 1.0 if error else 0.0],
                         dtype=torch.float64)
    every = comm.allgatherv(local, [3] * comm.size).view(comm.size, 3)
    if bool((every[:, 2] > 0).any()):
        comm.raise_if_any(f"{error} ({where})" if error and where else error)
    if bool((every[:, 1] > 0).any()):
        raise Preempted()
    return every[:, 0].tolist()


@torch.no_grad()
def finish(comm, model: torch.nn.Module, x: torch.Tensor, update=None) -> None:
    """The update path of the driver-updates steps: ``update()`` on the driver (the optimizer
    step), one unperturbed train-mode forward there (BatchNorm running statistics), then
    every rank gets the driver's parameters and buffers."""
    if comm.is_driver:
        if update is not None:
            update()
        model.train()
        model(x)
    share_state(comm, model)


def apply_gradient(optimizer, model: torch.nn.Module, coords, values: torch.Tensor) -> None:
    """The estimate over the active coordinates as ``.grad`` (zero elsewhere), one optimizer step."""
    optimizer.zero_grad(set_to_none=False)
    coords.fill_grad(model, values.to(next(model.parameters()).device))
    optimizer.step()


def has_running_stats(model: torch.nn.Module) -> bool:
    """Whether a train-mode forward changes the model's buffers (BatchNorm statistics)."""
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats
               for m in model.modules())


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
