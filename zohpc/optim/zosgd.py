"""The ZO-SGD family: a randomized gradient estimate (RGE) and optimizers built on it.

``estimate_grad_rge`` fills ``p.grad`` from loss values only, so any ``torch.optim``
optimizer can take the step (ZO-SGD = RGE + SGD, ZO-Adam = RGE + Adam, ...). For what
torch lacks there are two optimizers with the usual contract (``param_groups``, ``state``,
``state_dict``, ``step(closure)``): :class:`ZOSGD` (RGE + SGD with momentum, convenient
and self-contained) and :class:`ZOSignSGD` (the sign of the estimate, optionally of its
exponential moving average: ZO-signum).

The estimate is the one RGE core's (:mod:`zohpc.zo.rge`: directions regenerated from
``zohpc.seeding`` with parts ``(seed, step)``, its scaling convention ``dim / q``, unbiased
for the sphere-smoothed loss). ``scale="none"`` divides by ``dim`` (DeepZero's convention:
the estimate is ``dim`` times shorter). ``difference="central"`` uses
``(f(x + mu u) - f(x - mu u)) / (2 mu)``. A closure evaluates one point at a time, so the
core sees the closure through :class:`ClosureEvaluator` (one copy per pass). Query counts
per call: ``q + 1`` (forward) or ``2 q + 1`` (central; the base loss is still evaluated, for
the return value). Under MPI the ``q`` directions are split over the ranks and only loss
values travel.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ..stop import no_check
from ..zo.rge import rge_coefficients, rge_combine, sharded_losses
from ._queries import QueryRunner, first_trainable_index, flat, trainable, write

SCALES = ("dim", "none")
DIFFERENCES = ("forward", "central")


class ClosureEvaluator:
    """The RGE core's evaluator for a closure: each perturbed point is written into the
    parameters and the closure called (one copy per pass); the parameters are restored."""

    copies_per_pass = 1

    def __init__(self, closure, params, runner: QueryRunner):
        self.closure, self.params, self.runner = closure, params, runner
        self.x = flat(params)
        self.x64 = self.x.double()
        self.device = self.x.device  # where the RGE core draws the directions

    @torch.no_grad()
    def losses_of(self, deltas: torch.Tensor, check=no_check) -> torch.Tensor:
        out = torch.empty(deltas.shape[0], dtype=torch.float64)
        try:
            for k in range(deltas.shape[0]):
                check()
                write(self.params, (self.x64 + deltas[k].to(self.x.device)).to(self.x.dtype))
                out[k] = self.runner.call(self.closure)
        finally:
            write(self.params, self.x)
        return out


@torch.no_grad()
def estimate_grad_rge(closure, params, q: int = 20, mu: float = 1e-3, seed: int = 0, step: int = 0, comm=None,
                      scale: str = "dim", difference: str = "forward", runner: QueryRunner | None = None) -> float:
    """Fill ``p.grad`` of every trainable parameter with the RGE estimate; return ``f(x)``.

    Directions come from ``(seed, step)`` (the same on every rank); under MPI the ``q``
    queries are split over the ranks of ``comm`` and only loss values travel. The
    parameters are left unchanged.
    """
    if q < 1 or not mu > 0:
        raise ValueError(f"estimate_grad_rge: need q >= 1 and mu > 0, got q={q}, mu={mu}")
    if scale not in SCALES:
        raise ValueError(f"estimate_grad_rge: scale must be one of {SCALES}, got {scale!r}")
    if difference not in DIFFERENCES:
        raise ValueError(f"estimate_grad_rge: difference must be one of {DIFFERENCES}, got {difference!r}")
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("estimate_grad_rge: no trainable parameters")
    runner = runner if runner is not None else QueryRunner(comm)
    evaluator = ClosureEvaluator(closure, params, runner)
    dim, parts = evaluator.x.numel(), (int(seed), int(step))
    f0 = runner.call(closure)
    plus = sharded_losses(evaluator, dim, parts, q, mu, comm)
    if difference == "forward":
        diffs = (plus - f0) / mu
    else:
        diffs = (plus - sharded_losses(evaluator, dim, parts, q, -mu, comm)) / (2 * mu)
    coeffs = rge_coefficients(diffs, dim)
    if scale == "none":
        coeffs = coeffs / dim
    grad = rge_combine(coeffs, dim, parts, device=evaluator.device)
    offset = 0
    for p in params:
        n = p.numel()
        g = grad[offset:offset + n].view_as(p).to(device=p.device, dtype=p.dtype)
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)
        offset += n
    return f0


class RGE:
    """A seeded RGE estimator for pairing with any torch optimizer::

        est = RGE(model.parameters(), q=20, mu=1e-3, seed=0)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        loss = est.estimate(closure); opt.step()

    Call ``k`` draws the directions of ``(seed, k)``; ``state_dict()`` holds ``k``, so a
    resumed run draws the same directions.
    """

    def __init__(self, params, q: int = 20, mu: float = 1e-3, seed: int = 0, scale: str = "dim",
                 difference: str = "forward", comm=None):
        self.params = [p for p in params if p.requires_grad]
        self.q, self.mu, self.scale, self.difference = int(q), float(mu), scale, difference
        self.seed, self.comm = int(seed), comm
        self.runner = QueryRunner(comm)
        self.steps = 0
        self.queries = 0

    def estimate(self, closure) -> float:
        f0 = estimate_grad_rge(closure, self.params, self.q, self.mu, self.seed, self.steps, self.comm,
                               scale=self.scale, difference=self.difference, runner=self.runner)
        self.steps += 1
        self.queries += self.q * (2 if self.difference == "central" else 1) + 1
        return f0

    def state_dict(self) -> dict:
        return {"steps": self.steps, "queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        self.queries = int(state["queries"])


class _RGEOptimizer(Optimizer):
    """Common part: the estimator's step count (it names the directions) and query count live
    in ``state`` of the first trainable parameter, so ``state_dict`` carries them."""

    _STEP, _QUERIES = "zo_step", "zo_queries"

    def __init__(self, params, defaults, q, mu, scale, difference, seed, comm):
        if not defaults["lr"] > 0 or not 0 <= defaults["momentum"] < 1 or defaults["weight_decay"] < 0:
            raise ValueError(f"{type(self).__name__}: need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        if q < 1 or not mu > 0:
            raise ValueError(f"need q >= 1 and mu > 0, got q={q}, mu={mu}")
        if scale not in SCALES or difference not in DIFFERENCES:
            raise ValueError(f"scale must be one of {SCALES} and difference one of {DIFFERENCES}")
        super().__init__(params, defaults)
        self.q, self.mu, self.scale, self.difference = int(q), float(mu), scale, difference
        self.seed, self.comm = int(seed), comm
        self._runner = QueryRunner(comm)

    @property
    def closure_seconds(self) -> float:
        return self._runner.closure_seconds

    @property
    def num_queries(self) -> int:
        st = self.state.get(trainable(self.param_groups)[0], {})
        return int(st[self._QUERIES]) if self._QUERIES in st else 0

    def _estimate(self, closure) -> float:
        if closure is None:
            raise ValueError(f"{type(self).__name__}.step needs a closure that returns the loss")
        params = trainable(self.param_groups)
        st = self.state[params[0]]
        if self._STEP not in st:
            st[self._STEP] = torch.zeros((), dtype=torch.int64)
            st[self._QUERIES] = torch.zeros((), dtype=torch.int64)
        f0 = estimate_grad_rge(closure, params, self.q, self.mu, self.seed, int(st[self._STEP]), self.comm,
                               scale=self.scale, difference=self.difference, runner=self._runner)
        st[self._STEP] = st[self._STEP] + 1
        st[self._QUERIES] = st[self._QUERIES] + self.q * (2 if self.difference == "central" else 1) + 1
        return f0

    @torch.no_grad()
    def step(self, closure=None):
        """Estimate the gradient (fills ``.grad``), then update each parameter that has one; returns ``f(x)``."""
        f0 = self._estimate(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad and p.grad is not None:
                    self._update(group, p)
        return f0

    def _update(self, group: dict, p: torch.Tensor) -> None:
        """Move ``p`` by its ``.grad`` with ``group``'s options (the rule of each optimizer)."""
        raise NotImplementedError

    def _buffer(self, p, name: str, make):
        """``(state[p][name], new)``: the parameter's buffer, made by ``make()`` on first use."""
        st = self.state[p]
        new = name not in st
        if new:
            st[name] = make()
        return st[name], new

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        src = state_dict["state"].get(first_trainable_index(self.param_groups))
        if src is not None and self._STEP in src:
            st = self.state[trainable(self.param_groups)[0]]
            st[self._STEP] = src[self._STEP].detach().clone().cpu()
            st[self._QUERIES] = src[self._QUERIES].detach().clone().cpu()


class ZOSGD(_RGEOptimizer):
    """RGE + SGD (momentum, Nesterov and L2 weight decay as in ``torch.optim.SGD``)."""

    def __init__(self, params, lr: float, q: int = 20, mu: float = 1e-3, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, scale: str = "dim",
                 difference: str = "forward", seed: int = 0, comm=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                         q, mu, scale, difference, seed, comm)

    def _update(self, group: dict, p: torch.Tensor) -> None:
        """An SGD step on the estimate."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        d_p = p.grad if wd == 0 else p.grad + wd * p
        if mom:
            buf, new = self._buffer(p, "momentum_buffer", d_p.clone)
            if not new:
                buf.mul_(mom).add_(d_p)
            d_p = d_p + mom * buf if group["nesterov"] else buf
        p.add_(d_p, alpha=-lr)


class ZOSignSGD(_RGEOptimizer):
    """ZO-signSGD: ``x -= lr * sign(g)``; with ``momentum = beta > 0``, the sign of the moving
    average ``m = beta m + (1 - beta) g`` (ZO-signum). Weight decay is decoupled:
    ``x -= lr * wd * x``, so the sign step's length stays ``lr`` per coordinate.
    """

    def __init__(self, params, lr: float, q: int = 20, mu: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, scale: str = "dim", difference: str = "forward", seed: int = 0,
                 comm=None):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
                         q, mu, scale, difference, seed, comm)

    def _update(self, group: dict, p: torch.Tensor) -> None:
        """A sign step on the estimate (or on its moving average), after decoupled weight decay."""
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        g = p.grad
        if beta:
            buf, _ = self._buffer(p, "exp_avg", lambda: torch.zeros_like(p))
            buf.mul_(beta).add_(g, alpha=1 - beta)
            g = buf
        if wd:
            p.mul_(1 - lr * wd)
        p.add_(torch.sign(g), alpha=-lr)
