"""Coordinate-wise gradient estimates (CGE) from loss values only (RGE lives in :mod:`zohpc.zo.rge`)."""

from __future__ import annotations

import torch

from ..errors import ConfigError


@torch.no_grad()
def cge(engine, coords, mu: float, difference: str = "forward", start: int = 0, stop: int | None = None,
        base=None, check=None) -> torch.Tensor:
    """Coordinate-wise finite differences for global positions [start, stop) (1-D, model dtype).

    forward: (f(theta + mu e_k) - f(theta)) / mu, with f(theta) = ``base`` or the engine's base loss.
    central: (f(theta + mu e_k) - f(theta - mu e_k)) / (2 mu); both signs share batched passes.
    ``engine.prepare`` (or ``load_features``) must have been called for the current minibatch.
    ``check()``: called between stacked passes (a stop check), for this call only.
    """
    stop = coords.total if stop is None else stop
    if not mu > 0:
        raise ConfigError(f"config key 'zo.mu': must be > 0, got {mu}")
    if check is not None:
        saved, engine.check = engine.check, check
        try:
            return cge(engine, coords, mu, difference, start, stop, base)
        finally:
            engine.check = saved
    if difference == "forward":
        f0 = engine.base if base is None else torch.as_tensor(base, dtype=engine.base.dtype,
                                                               device=engine.base.device)
        return (engine.losses(coords, start, stop, mu, +1) - f0) / mu
    if difference == "central":
        plus, minus = engine.central_losses(coords, start, stop, mu)
        return (plus - minus) / (2 * mu)
    raise ConfigError(f"config key 'zo.difference': {difference!r} is not 'forward' or 'central'")
