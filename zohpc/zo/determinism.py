"""The determinism policy: a ZO finite difference needs f(theta) to be a fixed function.

Random modules and random ops in the forward pass are refused with a one-line reason before
any work. Dropout with probability 0 is deterministic (it returns its input) and is allowed:
PyTorch's transformer layers carry such modules when built with ``dropout=0.0``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                    nn.FeatureAlphaDropout)
_RANDOM_MODULES = _DROPOUT_MODULES + (nn.RReLU,)
_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout, F.rrelu, torch.dropout, torch.bernoulli, torch.rand,
                     torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
                     torch.randint_like, torch.normal, torch.multinomial, torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_"}


class NondeterministicModelError(ConfigError):
    """The model's forward pass is random (dropout, ...): ZO finite differences need f fixed."""


def _is_random(mod: nn.Module) -> bool:
    if isinstance(mod, _DROPOUT_MODULES):
        return float(mod.p) > 0.0
    if isinstance(mod, nn.MultiheadAttention):
        return float(mod.dropout) > 0.0
    return isinstance(mod, _RANDOM_MODULES)


def check_deterministic(model: nn.Module) -> None:
    """Raise NondeterministicModelError naming the first random module (dropout with p > 0, RReLU).

    Policy: active dropout is refused with one line saying how to turn it off (p = 0), never
    switched off silently: a forward that differs between queries makes finite differences noise.
    """
    for name, mod in model.named_modules():
        if _is_random(mod):
            p = getattr(mod, "p", getattr(mod, "dropout", None))
            raise NondeterministicModelError(
                f"model module {name!r} ({type(mod).__name__}" + (f", p={p}" if p is not None else "")
                + ") is random; zeroth-order training needs a deterministic forward pass: build it with "
                "p=0 (e.g. dropout=0.0 in nn.TransformerEncoderLayer) or remove it")


def _zero_probability(n: fx.Node) -> bool:
    """A functional dropout called with a literal p == 0 (deterministic)."""
    if n.target not in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout):
        return False
    p = n.args[1] if len(n.args) > 1 else n.kwargs.get("p", 0.5)
    return isinstance(p, (int, float)) and float(p) == 0.0


def check_graph_deterministic(graph: fx.Graph) -> None:
    """Raise NondeterministicModelError for the first node calling a random op."""
    for n in graph.nodes:
        if (n.op == "call_function" and n.target in _RANDOM_FUNCTIONS and not _zero_probability(n)) or (
                n.op == "call_method" and n.target in _RANDOM_METHODS):
            raise NondeterministicModelError(
                f"model forward calls random op {getattr(n.target, '__name__', n.target)!r} "
                f"(node {n.name}); zeroth-order training needs a deterministic forward pass")


__all__ = ["NondeterministicModelError", "check_deterministic", "check_graph_deterministic"]
