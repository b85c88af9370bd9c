"""Operation kinds: which rule (zohpc.zo.rules) a traced node follows.

:func:`classify` maps a torch.fx node to a kind from the call alone (module type, function,
method and its literal arguments):

* ``conv``, ``linear``, ``bn``: layers with incremental paths for one-channel deltas;
* ``chanwise``: elementwise or per-channel ops (activations, pooling) that keep a
  one-channel delta confined to its channel;
* ``flatten``, ``binary``, ``getitem``, ``pad``: shape and arithmetic ops with their own rules;
* ``rowwise``: ops whose output sample i depends on input sample i only (dim 0 is the batch),
  e.g. LayerNorm, softmax over a non-batch dim, scaled dot-product attention, ``F.linear``,
  PyTorch's batch-first multi-head attention and transformer encoder layers, reductions over
  non-batch dims: run once on the stacked copies;
* ``reshape``: tensor methods that only rearrange each sample (``view``/``reshape`` with a
  literal -1 first, ``transpose``/``permute``/``chunk``/``split``/``flatten``/``unflatten``
  away from dim 0): run once on the stacked copies, so explicit attention keeps its reuse;
* ``embedding``: a lookup table (its weight has an incremental rule: one row, one column);
* ``generic``: anything else, run copy by copy (always correct).
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

CHANWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Identity,
                    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                    nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
CHANWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                      torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish,
                      F.mish, F.softplus, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
                      F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                      F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                      F.adaptive_max_pool3d}
CHANWISE_METHODS = {"relu", "sigmoid", "tanh", "contiguous"}
BINARY = {operator.add: torch.add, operator.iadd: torch.add, torch.add: torch.add,
          operator.sub: torch.sub, operator.isub: torch.sub, torch.sub: torch.sub,
          operator.mul: torch.mul, operator.imul: torch.mul, torch.mul: torch.mul,
          operator.truediv: torch.div, operator.itruediv: torch.div, torch.div: torch.div}
BINARY_METHODS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_SOFTMAX = {F.softmax, torch.softmax, F.log_softmax, torch.log_softmax}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "softmax", "log_softmax"}
RESHAPE_METHODS = {"view", "reshape", "transpose", "permute", "chunk", "split", "flatten", "unflatten"}


def _literal_dims(v) -> tuple | None:
    if isinstance(v, int):
        return (v,)
    if isinstance(v, (tuple, list)) and v and all(isinstance(d, int) for d in v):
        return tuple(v)
    return None


def _keeps_batch(dims, ndim_hint=None) -> bool:
    """Literal dims that never name dim 0 (negative dims count from the end: never 0 for ndim > |d|)."""
    return dims is not None and all(d > 0 or d < 0 for d in dims)


def _dim_arg(n: fx.Node, pos: int, name: str = "dim"):
    return n.args[pos] if len(n.args) > pos else n.kwargs.get(name)


def _rowwise_module(mod: nn.Module, n: fx.Node) -> bool:
    if isinstance(mod, nn.LayerNorm):
        return len(n.args) == 1 and not n.kwargs
    if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
        return mod.dim is not None and _keeps_batch((mod.dim,)) and len(n.args) == 1
    if isinstance(mod, nn.MultiheadAttention):
        return mod.batch_first and set(n.kwargs) <= {"query", "key", "value", "key_padding_mask", "need_weights",
                                                     "average_attn_weights"}
    if isinstance(mod, nn.TransformerEncoderLayer):
        return mod.self_attn.batch_first and set(n.kwargs) <= {"src", "src_key_padding_mask"} and len(n.args) <= 1
    return False


def classify(n: fx.Node, modules: dict) -> str:
    """The kind of node ``n`` (module table ``modules``: name -> module)."""
    if n.op == "call_module":
        mod = modules[n.target]
        simple = len(n.args) == 1 and not n.kwargs
        if isinstance(mod, nn.Conv2d) and simple:
            return "conv"
        if isinstance(mod, nn.Linear) and simple:
            return "linear"
        if isinstance(mod, BN_TYPES) and simple:
            return "bn"
        if isinstance(mod, CHANWISE_MODULES) and simple and not getattr(mod, "return_indices", False):
            return "chanwise"
        if isinstance(mod, nn.Flatten) and simple and mod.start_dim == 1 and mod.end_dim == -1:
            return "flatten"
        if isinstance(mod, nn.Embedding) and simple and mod.max_norm is None:
            return "embedding"
        return "rowwise" if _rowwise_module(mod, n) else "generic"
    if n.op == "call_function":
        t = n.target
        if t in CHANWISE_FUNCTIONS and not n.kwargs.get("return_indices", False):
            return "chanwise"
        if t is torch.flatten and len(n.args) == 2 and n.args[1] == 1 and not n.kwargs:
            return "flatten"
        if t in BINARY and len(n.args) == 2 and not n.kwargs:
            return "binary"
        if t is operator.getitem:
            return "getitem"
        if t is F.pad:
            return "pad"
        if t is F.layer_norm:
            return "rowwise"
        if t in _SOFTMAX or t in _REDUCE_FUNCTIONS:
            return "rowwise" if _keeps_batch(_literal_dims(_dim_arg(n, 1))) else "generic"
        if t is F.scaled_dot_product_attention or t is F.linear:
            return "rowwise"  # (F.linear of a bare weight: a perturbed weight is stacked by its rule)
        if t is F.embedding and n.kwargs.get("max_norm") is None and len(n.args) <= 2:
            return "embedding"
        return "generic"
    if n.op == "call_method":
        if n.target in CHANWISE_METHODS and len(n.args) == 1 and not n.kwargs:
            return "chanwise"
        if n.target == "flatten" and len(n.args) == 2 and n.args[1] == 1 and not n.kwargs:
            return "flatten"
        if n.target in BINARY_METHODS and len(n.args) == 2 and not n.kwargs:
            return "binary"
        if n.target in _REDUCE_METHODS:
            return "rowwise" if _keeps_batch(_literal_dims(_dim_arg(n, 1))) else "generic"
        if n.target in RESHAPE_METHODS:
            return "reshape"  # (whether it keeps the batch in dim 0 needs the shapes: its rule)
        return "generic"
    return n.op  # placeholder, get_attr, output


def batch_args(n: fx.Node, modules: dict) -> set:
    """Argument positions and keyword names of a rowwise node that carry the batch in dim 0.

    Other tensor arguments (attention masks shaped (T, S), ...) are shared by every copy.
    """
    if n.op == "call_module":
        mod = modules[n.target]
        if isinstance(mod, nn.MultiheadAttention):
            return {0, 1, 2, "query", "key", "value", "key_padding_mask"}
        if isinstance(mod, nn.TransformerEncoderLayer):
            return {0, "src", "src_key_padding_mask"}
    if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
        return {0, 1, 2, "query", "key", "value"}
    return {0, "input"}


__all__ = ["BINARY", "BINARY_METHODS", "BN_TYPES", "CHANWISE_FUNCTIONS", "CHANWISE_METHODS", "CHANWISE_MODULES",
           "RESHAPE_METHODS", "batch_args", "classify"]
