"""SPSA (MeZO-style) with the ``torch.optim`` contract: ``optimizer.step(closure)``.

    opt = SPSA(model, lr=1e-4, mu=1e-3, queries=2)         # a Module: inference-level memory
    for x, y in batches:
        opt.step(torch.no_grad()(lambda: loss_fn(model(x), y)))

The estimate is ``g = (1/q) Σ_j d_j z_j`` with Gaussian ``z_j`` regenerated from (seed, step,
j, parameter) (:mod:`zohpc.zo.spsa`) and ``d_j = (f(θ + μz_j) − f(θ)) / μ`` (forward) or
``(f(θ + μz_j) − f(θ − μz_j)) / 2μ`` (central). The parameters are never written during the
queries and come back bit for bit.

Given a Module, the perturbed weights exist only while a layer reads them (parameters + one
inference forward + the largest weight; a weight one forward reads twice, a tied embedding, is
held from its first read to its last). Given plain parameters, each query swaps in a
perturbed copy of every parameter (one extra copy of the parameters). Momentum keeps one
buffer per parameter, Adam (``betas``) two: 2x or 3x the parameters, as backprop's optimizers.

Over MPI (``comm``) the ``q`` directions (and the base loss) are split over the ranks, only
their float64 loss values travel (one Allgatherv), and every rank applies the same update:
the replicas stay identical without broadcasting parameters.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from ..sharding import contiguous_split
from ..stop import no_check
from ..zo.spsa import perturbed, perturbed_value, trainable, update_


class SPSA(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, *, mu: float = 1e-3, queries: int = 1, difference: str = "central",
                 momentum: float = 0.0, betas=None, eps: float = 1e-8, weight_decay: float = 0.0, seed: int = 0,
                 comm=None):
        if difference not in ("forward", "central"):
            raise ValueError(f"difference must be 'forward' or 'central', got {difference!r}")
        if queries < 1 or mu <= 0 or lr <= 0:
            raise ValueError("queries >= 1, mu > 0 and lr > 0 are required")
        self.module = params if isinstance(params, nn.Module) else None
        plist = trainable(self.module) if self.module is not None else [p for p in params if p.requires_grad]
        if not plist:
            raise ValueError("no trainable parameters (requires_grad=True)")
        super().__init__(plist, dict(lr=lr, momentum=momentum, betas=None if betas is None else tuple(betas),
                                     eps=eps, weight_decay=weight_decay, spsa_step=0))
        if len(self.param_groups) != 1:
            raise ValueError("SPSA takes one parameter group")
        self.mu, self.q, self.difference, self.seed, self.comm = float(mu), int(queries), difference, int(seed), comm
        self.num_queries = 0
        self._reread: dict = {}  # tied weights seen read more than once per forward: their reads

    @property
    def params(self) -> list[torch.Tensor]:
        return self.param_groups[0]["params"]

    @property
    def step_index(self) -> int:
        """Steps completed (seeds the directions; in ``state_dict``, so a resumed run continues)."""
        return int(self.param_groups[0]["spsa_step"])

    def tasks(self) -> list[tuple[int, int]]:
        """The step's loss evaluations as (direction j, sign); (-1, 0) is the base loss."""
        if self.difference == "central":
            return [(j, s) for j in range(self.q) for s in (1, -1)]
        return [(-1, 0)] + [(j, 1) for j in range(self.q)]

    @contextlib.contextmanager
    def _at(self, j: int, sign: int):
        """Parameters at ``θ + sign·μ·z_j`` inside (exactly ``θ`` afterwards)."""
        seed_parts = (self.seed, self.step_index)
        if sign == 0:
            yield
        elif self.module is not None:
            with perturbed(self.module, seed_parts, j, sign * self.mu, self._reread):
                yield
        else:
            saved = [p.data for p in self.params]
            try:
                for i, p in enumerate(self.params):
                    p.data = perturbed_value(p, seed_parts, j, i, sign * self.mu)
                yield
            finally:
                for p, d in zip(self.params, saved):
                    p.data = d

    def losses(self, closure, check=no_check) -> torch.Tensor:
        """Every task's loss value on every rank (this rank evaluates its contiguous block)."""
        tasks = self.tasks()
        size, rank = (self.comm.size, self.comm.rank) if self.comm is not None else (1, 0)
        bounds = contiguous_split(len(tasks), size)

        def work():
            out = torch.empty(bounds[rank + 1] - bounds[rank], dtype=torch.float64)
            for k, (j, sign) in enumerate(tasks[bounds[rank]:bounds[rank + 1]]):
                check()
                with self._at(j, sign), torch.no_grad():
                    out[k] = float(closure())
            return out

        if self.comm is None or size == 1:
            return work()
        return self.comm.allgatherv_or_abandon(work, [bounds[r + 1] - bounds[r] for r in range(size)])

    def coefficients(self, losses: torch.Tensor) -> tuple[list[float], float]:
        """(the weight of each ``z_j`` in the estimate, the step's reported loss)."""
        if self.difference == "central":
            plus, minus = losses[0::2], losses[1::2]
            d = (plus - minus) / (2 * self.mu)
            loss = float((plus + minus).mean() / 2)
        else:
            d = (losses[1:] - losses[0]) / self.mu
            loss = float(losses[0])
        return (d / self.q).tolist(), loss

    @torch.no_grad()
    def step(self, closure, check=no_check) -> float:
        """One SPSA step; ``closure()`` returns the loss at the current (perturbed) point.
        ``check()`` runs between this rank's queries (a stop check may raise StepAbandoned:
        nothing has changed then). Raises ValueError if a loss is not finite (nothing applied)."""
        losses = self.losses(closure, check)
        if not bool(torch.isfinite(losses).all()):
            raise ValueError(f"loss is not finite in an SPSA query ({losses.tolist()})")
        return self.apply(losses)

    @torch.no_grad()
    def apply(self, losses: torch.Tensor) -> float:
        """The update from every task's loss value (the same on every rank); returns the loss."""
        self.num_queries += losses.numel()
        coeffs, loss = self.coefficients(losses)
        g = self.param_groups[0]
        t = self.step_index
        adam = None if g["betas"] is None else (g["betas"][0], g["betas"][1], g["eps"], t + 1)
        state = {i: self.state[p] for i, p in enumerate(self.params)}
        update_(self.params, (self.seed, t), coeffs, g["lr"], weight_decay=g["weight_decay"], state=state,
                momentum=g["momentum"], adam=adam)
        g["spsa_step"] = t + 1
        return loss if math.isfinite(loss) else math.nan
