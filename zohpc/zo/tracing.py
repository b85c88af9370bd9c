"""How the engine reads a model: torch.fx tracing, with PyTorch's transformer layers opened up.

``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` are single modules to torch.fx
(their forwards branch on tensor properties to pick fused kernels), so a perturbed weight
inside one re-runs the whole layer for every copy. Where a layer is used plainly (batch-first
self-attention with packed projections, no masks, no dropout, no extra key/value biases),
:class:`EngineTracer` records the arithmetic of the layer's training-mode forward op by op,
from the layer's own submodules and parameters: a query then starts at the perturbed
projection and re-runs only what follows it. Anything else stays one module (still correct,
reused at the layer's granularity). The engine computes its base loss through the same graph,
so a query and the base round alike.

The CNN idiom ``x.view(x.size(0), -1)`` is rewritten to ``x.flatten(1)`` (the same values): a
size read from the cached batch cannot describe a pass of many stacked copies.
"""

from __future__ import annotations

import inspect
import operator

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F


def _plain_layer(layer: nn.Module) -> bool:
    """A TransformerEncoderLayer whose training-mode arithmetic :func:`_encoder_layer` repeats."""
    if not isinstance(layer, nn.TransformerEncoderLayer):
        return False
    a = layer.self_attn
    params = a._parameters  # (not getattr: while tracing, reading a parameter records a node)
    dropouts = [m.p for m in (layer.dropout, layer.dropout1, layer.dropout2) if isinstance(m, nn.Dropout)]
    return (a.batch_first and a._qkv_same_embed_dim and params.get("in_proj_weight") is not None
            and params.get("bias_k") is None and params.get("bias_v") is None and not a.add_zero_attn
            and a.dropout == 0.0 and all(p == 0.0 for p in dropouts))


def _self_attention(attn: nn.MultiheadAttention, x):
    """``attn(x, x, x, need_weights=False)[0]`` for batch-first x (B, T, E), op by op."""
    heads = attn.num_heads
    q, k, v = F.linear(x, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.unflatten(-1, (heads, attn.embed_dim // heads)).transpose(1, 2) for t in (q, k, v))
    return attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))


def _encoder_layer(layer: nn.TransformerEncoderLayer, x):
    """The layer's forward without masks (its dropouts are p = 0: identities)."""
    def ff(h):
        return layer.linear2(layer.activation(layer.linear1(h)))

    if layer.norm_first:
        x = x + _self_attention(layer.self_attn, layer.norm1(x))
        return x + ff(layer.norm2(x))
    x = layer.norm1(x + _self_attention(layer.self_attn, x))
    return layer.norm2(x + ff(x))


def _only_input(layer, args, kwargs):
    """The input when a layer is called with it alone (its other arguments None or False), else None."""
    try:
        bound = inspect.signature(layer.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    (_, x), *rest = bound.arguments.items()
    return x if all(v is None or v is False for _, v in rest) else None


class EngineTracer(fx.Tracer):
    """torch.fx's tracer, with plain transformer encoder layers (and encoders of them) opened up."""

    def call_module(self, m, forward, args, kwargs):
        if isinstance(m, nn.TransformerEncoderLayer) and _plain_layer(m):
            x = _only_input(m, args, kwargs)
            if x is not None:
                return _encoder_layer(m, x)
        if isinstance(m, nn.TransformerEncoder) and all(_plain_layer(layer) for layer in m.layers):
            x = _only_input(m, args, kwargs)
            if x is not None:
                for layer in m.layers:
                    x = _encoder_layer(layer, x)
                return x if m.norm is None else m.norm(x)
        return super().call_module(m, forward, args, kwargs)


def _own_batch_size(node, x) -> bool:
    """``node`` computes ``x.size(0)`` or ``x.shape[0]`` (the batch size of the tensor x itself)."""
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method" and node.target == "size" and node.args[:1] == (x,):
        return (node.args[1:] == (0,) and not node.kwargs) or (len(node.args) == 1 and node.kwargs == {"dim": 0})
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        src = node.args[0]
        return isinstance(src, fx.Node) and src.args[:1] == (x,) and (
            (src.op == "call_function" and src.target is getattr and src.args[1] == "shape")
            or (src.op == "call_method" and src.target == "size" and len(src.args) == 1 and not src.kwargs))
    return False


def _batch_first_views(graph: fx.Graph) -> None:
    """``x.view(x.size(0), -1)`` (or ``reshape``, or ``x.shape[0]``) becomes ``x.flatten(1)``, and
    ``x.view(x.size(0), a, b)`` becomes ``x.view(-1, a, b)``: the same values, without a size
    that would name the cached batch in a query of many stacked copies."""
    for n in graph.nodes:
        if n.op != "call_method" or n.target not in ("view", "reshape") or n.kwargs or len(n.args) < 3:
            continue
        x, first, rest = n.args[0], n.args[1], n.args[2:]
        if not _own_batch_size(first, x):
            continue
        if rest == (-1,):
            n.target, n.args = "flatten", (x, 1)
        elif all(isinstance(r, int) and r >= 0 for r in rest):
            n.args = (x, -1) + tuple(rest)


def trace(model: nn.Module) -> fx.GraphModule:
    """The model's graph for the engine (raises what torch.fx raises on an untraceable model)."""
    tracer = EngineTracer()
    graph = tracer.trace(model)
    gm = fx.GraphModule(tracer.root, graph)
    _batch_first_views(gm.graph)
    gm.graph.eliminate_dead_code()  # (no plan may count an unused node as a consumer)
    gm.recompile()
    return gm


__all__ = ["EngineTracer", "trace"]
