"""The ZO-SGD family: a randomized gradient estimate (RGE) and optimizers built on it.

``estimate_grad_rge`` fills ``p.grad`` from loss values only, so any ``torch.optim``
optimizer can take the step (ZO-SGD = RGE + SGD, ZO-Adam = RGE + Adam, ...). For what
torch lacks there are two optimizers with the usual contract (``param_groups``, ``state``,
``state_dict``, ``step(closure)``): :class:`ZOSGD` (RGE + SGD with momentum, convenient
and self-contained) and :class:`ZOSignSGD` (the sign of the estimate, optionally of its
exponential moving average: ZO-signum).

RGE (forward difference)::

    g = (phi / q) * sum_j (f(x + mu u_j) - f(x)) / mu * u_j,    u_j uniform on the unit sphere

with ``phi = d`` (``scale="dim"``, the default: ``E[d u u^T] = I``, so ``g`` is an
unbiased estimate of the gradient of the sphere-smoothed loss and a learning rate means
what it means for SGD) or ``phi = 1`` (``scale="none"``: DeepZero's convention, the
estimate is ``d`` times shorter). ``difference="central"`` uses
``(f(x + mu u) - f(x - mu u)) / (2 mu)``. Query counts per call: ``q + 1`` (forward) or
``2 q + 1`` (central; the base loss is still evaluated, for the return value).
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from ._queries import QueryRunner, first_trainable_index, flat, trainable

SCALES = ("dim", "none")
DIFFERENCES = ("forward", "central")


def rge_directions(q: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """``q`` rows uniform on the unit sphere of R^dim (normalized Gaussians), float64 on the CPU."""
    z = torch.randn(q, dim, generator=generator, dtype=torch.float64)
    return z / z.norm(dim=1, keepdim=True)


@torch.no_grad()
def estimate_grad_rge(closure, params, q: int = 20, mu: float = 1e-3, generator: torch.Generator | None = None,
                      comm=None, scale: str = "dim", difference: str = "forward",
                      runner: QueryRunner | None = None) -> float:
    """Fill ``p.grad`` of every trainable parameter with the RGE estimate; return ``f(x)``.

    ``generator`` (CPU) draws the directions; under MPI every rank must pass a generator
    in the same state, then the ``q`` queries are split over the ranks of ``comm`` and only
    loss values travel. The parameters are left unchanged.
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
    if generator is None:
        generator = torch.default_generator
    runner = runner if runner is not None else QueryRunner(comm)
    x = flat(params)
    dim = x.numel()
    u = rge_directions(q, dim, generator).to(x.device)
    x64 = x.double()
    points = [x[None], (x64 + mu * u).to(x.dtype)]
    if difference == "central":
        points.append((x64 - mu * u).to(x.dtype))
    values = runner.evaluate(closure, params, x, torch.cat(points)).to(x.device)
    f0 = float(values[0])
    if difference == "forward":
        delta = (values[1:] - values[0]) / mu
    else:
        delta = (values[1:q + 1] - values[q + 1:]) / (2 * mu)
    phi = dim if scale == "dim" else 1
    grad = (phi / q) * (u.T @ delta)
    offset = 0
    for p in params:
        n = p.numel()
        g = grad[offset:offset + n].view_as(p).to(p.dtype)
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

    ``state_dict()`` holds the generator state, so a resumed run draws the same directions.
    """

    def __init__(self, params, q: int = 20, mu: float = 1e-3, seed: int = 0, scale: str = "dim",
                 difference: str = "forward", comm=None):
        self.params = [p for p in params if p.requires_grad]
        self.q, self.mu, self.scale, self.difference = int(q), float(mu), scale, difference
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(int(seed))
        self.runner = QueryRunner(comm)
        self.queries = 0

    def estimate(self, closure) -> float:
        f0 = estimate_grad_rge(closure, self.params, self.q, self.mu, self.generator, scale=self.scale,
                               difference=self.difference, runner=self.runner)
        self.queries += self.q * (2 if self.difference == "central" else 1) + 1
        return f0

    def state_dict(self) -> dict:
        return {"rng": self.generator.get_state(), "queries": self.queries}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["rng"].cpu())
        self.queries = int(state["queries"])


class _RGEOptimizer(Optimizer):
    """Common part: the estimator's generator and query count live in ``state`` (first param)."""

    _RNG, _QUERIES = "zo_rng", "zo_queries"

    def __init__(self, params, defaults, q, mu, scale, difference, seed, comm):
        if q < 1 or not mu > 0:
            raise ValueError(f"need q >= 1 and mu > 0, got q={q}, mu={mu}")
        if scale not in SCALES or difference not in DIFFERENCES:
            raise ValueError(f"scale must be one of {SCALES} and difference one of {DIFFERENCES}")
        super().__init__(params, defaults)
        self.q, self.mu, self.scale, self.difference = int(q), float(mu), scale, difference
        self.seed, self.comm = int(seed), comm
        self._gen = torch.Generator(device="cpu")
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
        if self._RNG not in st:
            self._gen.manual_seed(self.seed)
            st[self._RNG] = self._gen.get_state()
            st[self._QUERIES] = torch.zeros((), dtype=torch.int64)
        self._gen.set_state(st[self._RNG].cpu())
        f0 = estimate_grad_rge(closure, params, self.q, self.mu, self._gen, scale=self.scale,
                               difference=self.difference, runner=self._runner)
        st[self._RNG] = self._gen.get_state()
        st[self._QUERIES] = st[self._QUERIES] + self.q * (2 if self.difference == "central" else 1) + 1
        return f0

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        src = state_dict["state"].get(first_trainable_index(self.param_groups))
        if src is not None and self._RNG in src:
            st = self.state[trainable(self.param_groups)[0]]
            st[self._RNG] = src[self._RNG].detach().clone().cpu()
            st[self._QUERIES] = src[self._QUERIES].detach().clone().cpu()


class ZOSGD(_RGEOptimizer):
    """RGE + SGD (momentum, Nesterov and L2 weight decay as in ``torch.optim.SGD``)."""

    def __init__(self, params, lr: float, q: int = 20, mu: float = 1e-3, momentum: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, scale: str = "dim",
                 difference: str = "forward", seed: int = 0, comm=None):
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("ZOSGD: need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay),
                         q, mu, scale, difference, seed, comm)

    @torch.no_grad()
    def step(self, closure=None):
        """Estimate the gradient (fills ``.grad``) and take an SGD step; returns ``f(x)``."""
        f0 = self._estimate(closure)
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                d_p = p.grad if wd == 0 else p.grad + wd * p
                if mom:
                    st = self.state[p]
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        buf = st["momentum_buffer"] = d_p.clone()
                    else:
                        buf.mul_(mom).add_(d_p)
                    d_p = d_p + mom * buf if group["nesterov"] else buf
                p.add_(d_p, alpha=-lr)
        return f0


class ZOSignSGD(_RGEOptimizer):
    """ZO-signSGD: ``x -= lr * sign(g)``; with ``momentum = beta > 0``, the sign of the moving
    average ``m = beta m + (1 - beta) g`` (ZO-signum). Weight decay is decoupled:
    ``x -= lr * wd * x``, so the sign step's length stays ``lr`` per coordinate.
    """

    def __init__(self, params, lr: float, q: int = 20, mu: float = 1e-3, momentum: float = 0.0,
                 weight_decay: float = 0.0, scale: str = "dim", difference: str = "forward", seed: int = 0,
                 comm=None):
        if not lr > 0 or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError("ZOSignSGD: need lr > 0, 0 <= momentum < 1, weight_decay >= 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay),
                         q, mu, scale, difference, seed, comm)

    @torch.no_grad()
    def step(self, closure=None):
        f0 = self._estimate(closure)
        for group in self.param_groups:
            lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
            for p in group["params"]:
                if not p.requires_grad or p.grad is None:
                    continue
                g = p.grad
                if beta:
                    st = self.state[p]
                    buf = st.get("exp_avg")
                    if buf is None:
                        buf = st["exp_avg"] = torch.zeros_like(p)
                    buf.mul_(beta).add_(g, alpha=1 - beta)
                    g = buf
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(torch.sign(g), alpha=-lr)
        return f0
