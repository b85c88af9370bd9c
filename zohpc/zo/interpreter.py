"""Running the traced graph's nodes on concrete values: the unperturbed forward whose every
intermediate value the engine caches, and the generic path of a query (one node on stacked
copies). Kept apart from the engine's cache and queries so that one node's semantics
(BatchNorm on batch statistics, in-place ops copied, the fast max pooling) live in one place.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .kernels import batch_norm, maxpool_strided, pair, simple_maxpool
from .ops import BINARY, BN_TYPES


class NodeInterpreter:
    """Mixin of :class:`~zohpc.zo.engine.QueryEngine`: needs ``model``, ``modules``, ``kind``
    and ``nodes`` (set by the engine from the fx trace)."""

    def call(self, n, args, kwargs, override=None):
        """Run node ``n`` on concrete values (one copy, or stacked copies of a rowwise op).

        ``override``: (rel_name, tensor) replaces a parameter of the node's module.
        """
        if n.op == "get_attr":
            if override is not None:
                return override[1]
            obj = self.model
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "call_module":
            mod = self.modules[n.target]
            if self.kind[n] == "bn" or isinstance(mod, BN_TYPES):
                w, b = mod.weight, mod.bias
                if override is not None:
                    if override[0] == "weight":
                        w = override[1]
                    else:
                        b = override[1]
                return batch_norm(args[0], mod.eps, w, b, 1)[0]
            if self.kind[n] == "chanwise" and simple_maxpool(mod) and isinstance(args[0], torch.Tensor) \
                    and args[0].dim() == 4:
                H, W = args[0].shape[-2:]
                k = pair(mod.kernel_size)
                if mod.ceil_mode or (H % k[0] == 0 and W % k[1] == 0):
                    return maxpool_strided(args[0], k)
            if getattr(mod, "inplace", False):
                args = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)
            if override is not None:
                return torch.func.functional_call(mod, {override[0]: override[1]}, args, kwargs)
            return mod(*args, **kwargs)
        if n.op == "call_function":
            if n.target in BINARY:
                return BINARY[n.target](*args, **kwargs)
            if kwargs.get("inplace", False):
                kwargs = dict(kwargs, inplace=False)
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            if n.target.endswith("_") and isinstance(args[0], torch.Tensor):
                args = (args[0].clone(),) + tuple(args[1:])
            name = n.target
            if name == "view" and not any(isinstance(a, torch.dtype) for a in args[1:]) and "dtype" not in kwargs:
                name = "reshape"  # the same values; a view may not fit the engine's channels-last strides
            return getattr(args[0], name)(*args[1:], **kwargs)
        raise RuntimeError(f"cannot run node {n.op}")

    @torch.no_grad()
    def forward_cache(self, x) -> dict:
        """Every node's value on input ``x`` (the unperturbed forward)."""
        env = {}
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = x
            elif n.op != "output":
                env[n] = self.call(n, fx.node.map_arg(n.args, env.__getitem__),
                                   fx.node.map_arg(n.kwargs, env.__getitem__))
        return env
