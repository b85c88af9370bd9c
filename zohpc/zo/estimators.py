"""Gradient estimators from loss values only: CGE (coordinate-wise) and RGE (random directions)."""

from __future__ import annotations

import torch

from ..errors import ConfigError


@torch.no_grad()
def cge(engine, coords, mu: float, difference: str = "forward", start: int = 0, stop: int | None = None,
        base=None) -> torch.Tensor:
    """Coordinate-wise finite differences for global positions [start, stop) (1-D, model dtype).

    forward: (f(theta + mu e_k) - f(theta)) / mu, with f(theta) = ``base`` or the engine's base loss.
    central: (f(theta + mu e_k) - f(theta - mu e_k)) / (2 mu); both signs share batched passes.
    ``engine.prepare`` (or ``load_features``) must have been called for the current minibatch.
    """
    stop = coords.total if stop is None else stop
    if not mu > 0:
        raise ConfigError(f"config key 'zo.mu': must be > 0, got {mu}")
    if difference == "forward":
        f0 = engine.base if base is None else torch.as_tensor(base, dtype=engine.base.dtype,
                                                               device=engine.base.device)
        return (engine.losses(coords, start, stop, mu, +1) - f0) / mu
    if difference == "central":
        plus, minus = engine.central_losses(coords, start, stop, mu)
        return (plus - minus) / (2 * mu)
    raise ConfigError(f"config key 'zo.difference': {difference!r} is not 'forward' or 'central'")


@torch.no_grad()
def rge(loss_closure, params, q: int, mu: float, generator: torch.Generator, normalize: str = "unit",
        base=None) -> list:
    """Randomized gradient estimate (1/q) sum_j (f(theta + mu u_j) - f(theta)) / mu * u_j.

    Directions: z_j ~ N(0, I) over all of ``params`` jointly, drawn from ``generator`` (on the
    parameters' device), in parameter order.
      normalize="unit"   : u = z/||z|| (DeepZero). E[g] ~ grad f / d (a scaled-down gradient).
      normalize="unit_d" : u = z/||z||, estimate multiplied by d: E[g] ~ grad f (unbiased for
                           the sphere-smoothed f), the common d-scaled variant.
      normalize="gaussian": u = z, no scaling: E[g] ~ grad f (Gaussian smoothing).
    ``loss_closure()`` returns the loss at the current parameter values. Parameters are
    perturbed in place and restored bit-exactly (copied back) after every query.
    """
    if normalize not in ("unit", "unit_d", "gaussian"):
        raise ConfigError(f"config key 'zo.rge_normalize': {normalize!r} is not unit, unit_d or gaussian")
    if int(q) < 1:
        raise ConfigError(f"config key 'zo.q': must be >= 1, got {q}")
    params = list(params)
    saved = [p.detach().clone() for p in params]
    d = sum(p.numel() for p in params)
    f0 = float(loss_closure()) if base is None else float(base)
    grads = [torch.zeros_like(p) for p in params]
    try:
        for _ in range(int(q)):
            zs = [torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device) for p in params]
            if normalize != "gaussian":
                norm = torch.sqrt(sum((z * z).sum() for z in zs))
                zs = [z / norm for z in zs]
            for p, z in zip(params, zs):
                p.add_(z, alpha=mu)
            fq = float(loss_closure())
            for p, s in zip(params, saved):
                p.copy_(s)
            coef = (fq - f0) / mu / q
            if normalize == "unit_d":
                coef *= d
            for g, z in zip(grads, zs):
                g.add_(z, alpha=coef)
    finally:
        for p, s in zip(params, saved):
            p.copy_(s)
    return grads
