"""The executor: runs a query's decisions (zohpc.zo.rules) with the kernels (zohpc.zo.kernels).

:data:`PATHS` maps each decision's ``how`` to a function ``(g, n, how, reps, Q, last) -> rep``
(``g``: the QueryEngine, ``reps``: node -> concrete rep, ``last``: inputs that die at ``n``,
whose owned tensors may be updated in place). :func:`run_source` does the perturbed layer.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from . import kernels as K
from .ops import BINARY, BINARY_METHODS, batch_args
from .reps import Chan, Full, Per
from .rules import pad_args


def block_index(g, rep: Chan):
    if rep.idx_t is None:
        rep.idx_t = K.block_index(rep.idx, rep.s, g.device)
    return rep.idx_t


def materialize(g, n, rep, Q):
    """Full stacked tensor (Q*B, ...) of a Chan or Full rep (of differences in a delta mode)."""
    if isinstance(rep, Full):
        return rep.t
    return K.materialize(g.env[n], rep.idx, rep.s, rep.v, Q, g.channels_last, zero=g.delta is not None)


def copy_value(g, n, rep, q, Q):
    """Copy q's value of node n (its difference in a delta mode)."""
    base = g.env[n]
    if g.delta is not None and isinstance(base, torch.Tensor):
        base = base.new_zeros(()).expand(base.shape) if rep is None or isinstance(rep, Chan) else base
    if rep is None:
        return base
    if isinstance(rep, Per):
        return rep.vals[q]
    if isinstance(rep, Full):
        if isinstance(rep.t, tuple):
            return tuple(t.view(Q, *b.shape)[q] if isinstance(t, torch.Tensor) else t for t, b in zip(rep.t, base))
        return rep.t.view(Q, *base.shape)[q]
    s, i = rep.s, rep.idx[q]
    c = base.clone(memory_format=torch.contiguous_format) if g.delta is not None else base.clone()
    c[:, i * s:(i + 1) * s] = rep.v.view(Q, base.shape[0], s, *base.shape[2:])[q]
    return c


def run_generic(g, n, how, reps, Q, last=(), override=None):
    vals = []
    for q in range(Q):
        args = map_arg(n.args, lambda a: copy_value(g, a, reps.get(a), q, Q))
        kwargs = map_arg(n.kwargs, lambda a: copy_value(g, a, reps.get(a), q, Q))
        vals.append(g.call(n, args, kwargs, None if override is None else (override[0], override[1][q])))
    return Per(vals)


def run_generic_stacked(g, n, how, reps, Q, last=()):
    """Copy by copy (:func:`run_generic`), then the copies stacked along dim 0."""
    return Full(torch.cat(run_generic(g, n, how, reps, Q, last).vals), own=True)


def _block_delta(g, a, r: Chan, Q):
    """A Chan rep's change of its blocks, (Q*B, s, ...): its value less the cached block, or
    the rep itself in a delta mode (where it already holds the difference)."""
    if g.delta is not None:
        return r.v
    return K.chan_delta(g.env[a], r.v, block_index(g, r), r.s, Q)


def _product(g):
    """The delta mode's low-precision batched product (its output is the difference alone), or None."""
    return None if g.delta is None else g.delta.lowp.bmm


# The conv and linear paths serve both modes: in a delta mode they move differences (no
# cached output added, no bias, the mode's low-precision products; zohpc.zo.delta).

def _chan_product(g, n, how, reps, Q, last):
    """conv_chan, linear_chan: the cached output plus the input blocks' change times the
    weight's matching slice, all copies in one batched matmul."""
    a = n.args[0]
    r, mod = reps[a], g.modules[n.target]
    delta, index = _block_delta(g, a, r, Q), block_index(g, r)
    if how == "conv_chan":
        out, flops = K.chan_conv(g.env[a], g.env[n], delta, mod.weight, index, mod.padding, mod.stride,
                                 mod.dilation, Q, g.channels_last, bmm=_product(g))
    else:
        out, flops = K.chan_linear(g.env[n], delta, mod.weight, index, Q, bmm=_product(g))
    g.flops += flops
    return Full(out, own=True)


def _conv_full(g, n, how, reps, Q, last):
    a = n.args[0]
    mod = g.modules[n.target]
    t = materialize(g, a, reps[a], Q)
    out = mod(t) if g.delta is None else g.delta.lowp.conv(mod, t)
    g.flops += 2 * t.shape[0] * mod.weight.numel() * math.prod(out.shape[2:])
    return Full(out, own=True)


def _linear_full(g, n, how, reps, Q, last):
    a = n.args[0]
    mod = g.modules[n.target]
    t = materialize(g, a, reps[a], Q)
    g.flops += 2 * (t.numel() // t.shape[-1]) * mod.weight.numel()  # every row: (Q*B, ..., in)
    return Full(mod(t) if g.delta is None else g.delta.lowp.linear(t, mod.weight), own=True)


def _bn_chan(g, n, how, reps, Q, last):
    r, mod = reps[n.args[0]], g.modules[n.target]
    idx = block_index(g, r)
    w = None if mod.weight is None else mod.weight.index_select(0, idx).view(Q, r.s)
    b = None if mod.bias is None else mod.bias.index_select(0, idx).view(Q, r.s)
    return Chan(r.idx, r.s, K.batch_norm(r.v, mod.eps, w, b, Q)[0], r.idx_t, own=True)


def _bn_full(g, n, how, reps, Q, last):
    mod = g.modules[n.target]
    return Full(K.batch_norm(reps[n.args[0]].t, mod.eps, mod.weight, mod.bias, Q)[0], own=True)


def _is_relu(g, n):
    if n.op == "call_module":
        return type(g.modules[n.target]) is nn.ReLU and not n.kwargs
    if n.op == "call_function":
        return n.target in (F.relu, torch.relu) and len(n.args) == 1 and not n.kwargs
    return n.op == "call_method" and n.target == "relu"


def _chanwise(g, n, how, reps, Q, last):
    a = n.args[0]
    r = reps[a]
    if _is_relu(g, n) and r.own and a in last:  # input dies here: rectify in place
        if isinstance(r, Chan):
            return Chan(r.idx, r.s, r.v.relu_(), r.idx_t, own=True)
        return Full(r.t.relu_(), own=True)

    def f(x):
        return g.call(n, (x,) + tuple(n.args[1:]), n.kwargs)
    if isinstance(r, Chan):
        return Chan(r.idx, r.s, f(r.v), r.idx_t, own=True)
    return Full(f(r.t), own=True)


def _flatten_chan(g, n, how, reps, Q, last):
    a = n.args[0]
    r = reps[a]
    inner = math.prod(g.env[a].shape[2:])
    return Chan(r.idx, r.s * inner, r.v.reshape(r.v.shape[0], -1))


def _flatten_full(g, n, how, reps, Q, last):
    return Full(reps[n.args[0]].t.flatten(1))


def _binary_op(n):
    return BINARY[n.target] if n.op == "call_function" else BINARY_METHODS[n.target]


def _binary_chan(g, n, how, reps, Q, last):
    args = n.args
    rs = [reps.get(a) if isinstance(a, fx.Node) else None for a in args]
    c0 = next(r for r in rs if isinstance(r, Chan))
    vals = []
    for a, r in zip(args, rs):
        if not isinstance(a, fx.Node):
            vals.append(a)
        elif r is None:
            base = g.env[a]
            vals.append(K.gather_view(base, block_index(g, c0), c0.s, Q).reshape(Q * base.shape[0], c0.s,
                                                                                   *base.shape[2:]))
        else:
            vals.append(r.v)
    v = K.binop(_binary_op(n), vals, args, rs, last, lambda r: r.v)
    return Chan(c0.idx, c0.s, v, c0.idx_t, own=True)


def _binary_full(g, n, how, reps, Q, last):
    """The op on stacked operands (Q, B, ...); an unchanged one broadcasts, and a perturbed
    parameter's copies (``binary_param``: read by get_attr) enter as (Q, 1.., *shape)."""
    args = n.args
    rs = [reps.get(a) if isinstance(a, fx.Node) else None for a in args]
    out_base = g.env[n]
    vals = []
    for a, r in zip(args, rs):
        if not isinstance(a, fx.Node):
            vals.append(a)
        elif r is None:
            vals.append(g.env[a])
        elif isinstance(r, Per):
            vals.append(K.parameter_copies(r.vals, Q, out_base.dim()))
        else:
            vals.append(materialize(g, a, r, Q).view(Q, *g.env[a].shape))
    stacked = [None if isinstance(r, Per) else r for r in rs]  # (parameter copies are never written)
    res = K.binop(_binary_op(n), vals, args, stacked, last, lambda r: r.t, (Q,) + tuple(out_base.shape))
    return Full(res.reshape(Q * out_base.shape[0], *out_base.shape[1:]), own=True)


def _getitem(g, n, how, reps, Q, last):
    a, index = n.args[0], n.args[1]
    r = reps[a]
    if how == "getitem_full" or how == "getitem_tuple":
        return Full(r.t[index])
    if how == "getitem_chan":
        return Chan(r.idx, r.s, r.v[index], r.idx_t)
    return Full(materialize(g, a, r, Q)[index])


def _pad(g, n, how, reps, Q, last):
    a = n.args[0]
    r = reps[a]
    pad, mode = pad_args(n)
    rest_args, kwargs = n.args[2:], n.kwargs
    if g.delta is not None:  # a difference is padded with zeros, whatever the constant
        rest_args, kwargs = rest_args[:1], {k: v for k, v in kwargs.items() if k != "value"}
    if how == "pad_full":
        return Full(F.pad(r.t, pad, *rest_args, **kwargs))
    if how == "pad_chan":
        return Chan(r.idx, r.s, F.pad(r.v, pad, *rest_args, **kwargs), r.idx_t)
    if how == "pad_shift":
        inner = tuple(pad[:-2])
        v = F.pad(r.v, inner, *rest_args, **kwargs) if inner and any(inner) else r.v
        sh = pad[-2] // r.s
        return Chan([i + sh for i in r.idx], r.s, v)
    return Full(F.pad(materialize(g, a, r, Q), pad, *rest_args, **kwargs))


def _rowwise(g, n, how, reps, Q, last):
    """The op once on the stacked copies; unchanged batch inputs repeated per copy."""
    carry = batch_args(n, g.modules)

    def value(key, a):
        if not isinstance(a, fx.Node):
            return a
        r = reps.get(a)
        if r is not None:
            return materialize(g, a, r, Q)
        return K.repeat_copies(g.env[a], Q) if key in carry else g.env[a]

    args = tuple(value(i, a) for i, a in enumerate(n.args))
    kwargs = {k: value(k, a) for k, a in n.kwargs.items()}
    return Full(g.call(n, args, kwargs), own=True)


PATHS = {"conv_chan": _chan_product, "conv_full": _conv_full, "linear_chan": _chan_product, "linear_full": _linear_full,
         "bn_chan": _bn_chan, "bn_full": _bn_full, "chanwise": _chanwise, "flatten_chan": _flatten_chan,
         "flatten_full": _flatten_full, "binary_chan": _binary_chan, "binary_full": _binary_full,
         "binary_param": _binary_full, "getitem_full": _getitem, "getitem_chan": _getitem,
         "getitem_mat": _getitem, "getitem_tuple": _getitem, "pad_full": _pad, "pad_chan": _pad,
         "pad_shift": _pad, "pad_mat": _pad, "rowwise": _rowwise, "generic": run_generic,
         "generic_stacked": run_generic_stacked}


def run_source(g, plan, n, how, flat, steps, Q, reps, override):
    """Rep of the perturbed consumer node itself (incremental where its rule allows).

    In a delta mode the incremental paths start from zeros instead of the cached output (they
    then give the difference) and the per-copy paths are the delta mode's (zohpc.zo.delta).
    """
    out_base = g.env[n]
    if g.delta is not None:
        if how in ("source_generic", "source_stacked"):
            return g.delta.source(g, n, how, reps, Q, override())
        out_base = torch.zeros_like(out_base)
    if how in ("source_generic", "source_stacked"):
        rep = run_generic(g, n, how, reps, Q, override=override())
        if how == "source_generic":
            return rep
        if isinstance(out_base, tuple):  # (attention output, weights or None)
            return Full(tuple(torch.cat([v[i] for v in rep.vals]) if isinstance(t, torch.Tensor) else t
                              for i, t in enumerate(out_base)), own=False)
        return Full(torch.cat(rep.vals), own=True)
    dev = out_base.device
    mod = g.modules[n.target]
    if how == "source_emb":
        D = mod.weight.shape[1]
        return Full(K.embedding_rows(out_base, g.env[n.args[0]], [f // D for f in flat], [f % D for f in flat],
                                     steps), own=True)
    if how == "source_conv_b" or how == "source_conv_w":
        B, Cout, Ho, Wo = out_base.shape
        v = torch.empty(Q, B, Ho, Wo, dtype=out_base.dtype, device=dev)
        if how == "source_conv_b":
            for q, o in enumerate(flat):
                torch.add(out_base[:, o], steps[q], out=v[q])
            return Chan(flat, 1, v.view(Q * B, 1, Ho, Wo), own=True)
        xpad = g.padded_input(n, mod)
        w = mod.weight
        cin_g, kh, kw = w.shape[1], w.shape[2], w.shape[3]
        cout_g = Cout // mod.groups
        sh, sw = mod.stride
        dh, dw = mod.dilation
        f = torch.tensor(flat, device=dev)
        o, r = f // (cin_g * kh * kw), f % (cin_g * kh * kw)
        c, r = r // (kh * kw), r % (kh * kw)
        i, j = r // kw, r % kw
        cin = (o // cout_g) * cin_g + c
        rows = (i * dh)[:, None] + sh * torch.arange(Ho, device=dev)  # (Q, Ho)
        cols = (j * dw)[:, None] + sw * torch.arange(Wo, device=dev)  # (Q, Wo)
        if B * Ho * Wo >= 4096:  # large slices: Q strided copies beat one gather
            o_l, cin_l, i_l, j_l = o.tolist(), cin.tolist(), i.tolist(), j.tolist()
            cached, xpad = g.channel_planes(n, mod, Q)
            start = cached if g.delta is None else out_base  # (a delta mode starts from zeros)
            for q in range(Q):
                ih, jw = i_l[q] * dh, j_l[q] * dw
                sl = xpad[:, cin_l[q], ih:ih + sh * (Ho - 1) + 1:sh, jw:jw + sw * (Wo - 1) + 1:sw]
                torch.add(start[:, o_l[q]], sl, alpha=steps[q], out=v[q])
            return Chan(o_l, 1, v.view(Q * B, 1, Ho, Wo), own=True)
        sl = xpad[:, cin[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, Q, Ho, Wo)
        st = torch.tensor(steps, dtype=v.dtype, device=dev).view(1, Q, 1, 1)
        torch.addcmul(out_base[:, o], sl, st, out=v.permute(1, 0, 2, 3))
        return Chan(o.tolist(), 1, v.view(Q * B, 1, Ho, Wo), own=True)
    if how in ("source_lin_w_nd", "source_lin_b_nd"):
        return Full(K.linear_nd_entry(out_base, g.env[n.args[0]], flat, steps, how == "source_lin_w_nd"), own=True)
    if how in ("source_lin_w", "source_lin_b"):
        x = g.env[n.args[0]]
        B = out_base.shape[0]
        v = torch.empty(Q, B, dtype=out_base.dtype, device=dev)
        if how == "source_lin_w":
            f = torch.tensor(flat, device=dev)
            o, c = f // x.shape[1], f % x.shape[1]
            st = torch.tensor(steps, dtype=v.dtype, device=dev).view(1, Q)
            torch.addcmul(out_base[:, o], x[:, c], st, out=v.t())
            return Chan(o.tolist(), 1, v.view(Q * B, 1), own=True)
        for q, o in enumerate(flat):
            torch.add(out_base[:, o], steps[q], out=v[q])
        return Chan(flat, 1, v.view(Q * B, 1), own=True)
    # bn_w, bn_b
    x = g.env[n.args[0]]
    mean, invstd = g.bn_stats[n]
    B = out_base.shape[0]
    v = torch.empty(Q, *out_base[:, 0].shape, dtype=out_base.dtype, device=dev)
    for q, o in enumerate(flat):
        if how == "source_bn_b":
            torch.add(out_base[:, o], steps[q], out=v[q])
        else:
            xhat = (x[:, o] - mean[0, 0, o]) * invstd[0, 0, o]
            torch.add(out_base[:, o], xhat, alpha=steps[q], out=v[q])
    return Chan(flat, 1, v.view(Q * B, 1, *out_base.shape[2:]), own=True)


def settle_ownership(n, rep, reps, last):
    """In-place updates are allowed only on a tensor that no other live rep shares.

    If the output shares memory with an input rep (a view, nn.Identity, an in-place op),
    it inherits that input's ownership when the input dies here; otherwise both lose it.
    """
    t = rep.v if isinstance(rep, Chan) else rep.t
    if not isinstance(t, torch.Tensor):
        rep.own = False
        return
    ptr = t.untyped_storage().data_ptr()
    for a in n.all_input_nodes:
        r = reps.get(a)
        if isinstance(r, (Chan, Full)):
            u = r.v if isinstance(r, Chan) else r.t
            if isinstance(u, torch.Tensor) and u.untyped_storage().data_ptr() == ptr:
                rep.own = rep.own and r.own and a in last
                if a not in last:
                    r.own = False


__all__ = ["PATHS", "copy_value", "materialize", "run_generic", "run_source", "settle_ownership"]
