"""Tensor kernels of the query engine: pure functions of tensors (no engine state).

Each returns new tensors (or writes into an ``out`` it is given) and never touches the
model. The executor (zohpc.zo.executor) chooses which to call from the rules' decisions.
A few ATen CPU kernels that are slow for these shapes are replaced by exact equivalents
(strided max-pool, per-copy batch-norm through ATen's own kernel).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def simple_maxpool(mod) -> bool:
    """MaxPool2d with non-overlapping windows (kernel == stride, no padding/dilation)."""
    return (type(mod) is nn.MaxPool2d and not mod.return_indices and pair(mod.kernel_size) == pair(mod.stride)
            and pair(mod.padding) == (0, 0) and pair(mod.dilation) == (1, 1))


def maxpool_strided(x, kernel):
    """Exact max pooling of non-overlapping windows as elementwise maxima of strided views.

    Rows first, then columns: in NHWC order a row slice is one contiguous run of W*C values,
    so the first (largest) pass streams, and the second reads only 1/kh of the input; 2.7x
    faster than one max per window offset, and 5-8x faster than ATen's CPU max_pool2d for
    the small maps here. ceil_mode windows are handled by padding with -inf (with no
    padding they always start inside the input). The maximum is exact in any order.
    """
    kh, kw = kernel
    H, W = x.shape[-2:]
    ph, pw = (-H) % kh, (-W) % kw
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=float("-inf"))
    if kh == kw == 1:
        return x.clone()
    rows = _max_of_slices(x, kh, lambda i: (..., slice(i, None, kh), slice(None)))
    return _max_of_slices(rows, kw, lambda j: (..., slice(j, None, kw)))


def _max_of_slices(x, k, index):
    """max over i < k of x[index(i)] (a new tensor; x itself when k is 1)."""
    if k == 1:
        return x
    out = torch.maximum(x[index(0)], x[index(1)])
    for i in range(2, k):
        torch.maximum(out, x[index(i)], out=out)
    return out


def batch_norm(x, eps, w, b, Q, apply=True):
    """Per-copy batch-statistics BatchNorm of x stacked (Q*B, C, ...).

    ``w``/``b``: None, (C,) or per-copy (Q, C). Returns (y or None, mean, invstd), the
    statistics shaped (Q, 1, C, 1..). With shared weights each copy goes through ATen's
    own batch-norm kernel (what the plain model uses; 2x faster than composing the
    reductions); per-copy weights (one-channel reps, small) use plain tensor sums.
    """
    xv = x.view(Q, x.shape[0] // Q, *x.shape[1:])
    shp = (Q, 1, -1) + (1,) * (xv.dim() - 3)
    if w is None or w.dim() == 1:
        out = torch.empty_like(x)
        ov = out.view(xv.shape)
        C = x.shape[1]
        mean = x.new_empty(Q, C)
        invstd = x.new_empty(Q, C)
        for q in range(Q):
            torch.native_batch_norm(xv[q], w, b, None, None, True, 0.0, eps, out=(ov[q], mean[q], invstd[q]))
        return (out if apply else None), mean.view(shp), invstd.view(shp)
    dims = (1,) + tuple(range(3, xv.dim()))
    count = xv.numel() // (Q * xv.shape[2])
    mean = xv.sum(dim=dims, keepdim=True) / count
    d = xv - mean
    var = torch.linalg.vector_norm(d, dim=dims, keepdim=True).square_() / count
    invstd = torch.rsqrt(var + eps)
    d.mul_(invstd * w.view(shp))
    if b is not None:
        d.add_(b.view(shp))
    return d.view(x.shape), mean, invstd


def block_index(idx, s, device):
    """Channel indices of blocks ``idx`` (each ``s`` wide), flattened: (Q*s,)."""
    t = torch.tensor(idx, dtype=torch.long, device=device)
    if s > 1:
        t = (t[:, None] * s + torch.arange(s, device=device)).reshape(-1)
    return t


def gather_view(base, index, s, Q):
    """Per-copy block of the cached ``base`` as a (Q, B, s, ...) view (no reordering copy)."""
    g = base.index_select(1, index)
    return g.view(base.shape[0], Q, s, *base.shape[2:]).transpose(0, 1)


def chan_delta(base, v, index, s, Q):
    """v - cached block, (Q*B, s, ...), in one pass."""
    vv = v.view(Q, base.shape[0], s, *base.shape[2:])
    out = torch.empty_like(vv, memory_format=torch.contiguous_format)
    torch.sub(vv, gather_view(base, index, s, Q), out=out)
    return out.view(v.shape)


def materialize(base, idx, s, v, Q, channels_last, zero=False):
    """Full stacked tensor (Q*B, ...) of the cached ``base`` with block idx[q] replaced by v's.

    ``zero``: zeros stand for the base instead (a difference confined to the blocks, delta modes).
    """
    B = base.shape[0]
    t = torch.empty((Q * B,) + tuple(base.shape[1:]), dtype=base.dtype, device=base.device,
                    memory_format=torch.channels_last if channels_last and base.dim() == 4
                    else torch.contiguous_format)
    tv = t.view(Q, *base.shape)
    if zero:
        tv.zero_()
    else:
        tv.copy_(base.unsqueeze(0).expand_as(tv))
    vv = v.view(Q, B, s, *base.shape[2:])
    for q, i in enumerate(idx):
        tv[q, :, i * s:(i + 1) * s] = vv[q]
    return t


def repeat_copies(base, Q):
    """Q copies of an unchanged batch tensor stacked along dim 0: (Q*B, ...), to read only
    (for Q = 1 it is a view of ``base``; :func:`fresh_copies` gives a tensor to write)."""
    return base.unsqueeze(0).expand(Q, *base.shape).reshape(Q * base.shape[0], *base.shape[1:])


def fresh_copies(base, Q):
    """Q copies of ``base`` stacked along dim 0 in a new tensor, (Q*B, ...), safe to write."""
    out = torch.empty((Q * base.shape[0],) + tuple(base.shape[1:]), dtype=base.dtype, device=base.device)
    out.view(Q, *base.shape).copy_(base.unsqueeze(0).expand(Q, *base.shape))
    return out


def parameter_copies(vals, Q, ndim):
    """Q copies of a parameter (a get_attr source's values) stacked as (Q, 1.., *shape), to
    broadcast against operands of ``ndim`` dims viewed as (Q, B, ...)."""
    p = torch.stack(vals)
    return p.view(Q, *([1] * (ndim + 1 - p.dim())), *p.shape[1:])


def chan_conv(x_base, out_base, delta, w, index, padding, stride, dilation, Q, channels_last, bmm=None):
    """cached_out + conv(delta, W[:, block]) for a delta confined to one channel block per copy.

    ``bmm``: given, the product alone, ``bmm(cols, weights)`` (a delta mode's low precision:
    the output is the difference, without the cached output).

    im2col of the small delta (Q*B, s, H, W) from kh*kw strided views (F.unfold loops over
    the samples and is several times slower), times the (s*kh*kw, Cout) weight slice of each
    copy, added to the cached output by one batched matmul whose result is already NHWC. The
    columns are built as (Q, s*kh*kw, B*Ho*Wo), so each view lands in one contiguous run (2x
    faster than writing every kh*kw-th value), and the matmul reads them transposed (the
    same products, bit for bit). Returns (out (Q*B, Cout, Ho, Wo), FLOPs).
    """
    B, s = x_base.shape[0], delta.shape[1]
    Cout, kh, kw = w.shape[0], w.shape[2], w.shape[3]
    Ho, Wo = out_base.shape[2], out_base.shape[3]
    ph, pw = pair(padding)
    sh, sw = pair(stride)
    dh, dw = pair(dilation)
    dp = F.pad(delta, (pw, pw, ph, ph)) if ph or pw else delta
    dp = dp.view(Q, B, s, dp.shape[2], dp.shape[3]).transpose(1, 2)  # (Q, s, B, H', W')
    cols = torch.empty(Q, s, kh, kw, B, Ho, Wo, dtype=delta.dtype, device=delta.device)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j].copy_(dp[..., i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw])
    K = s * kh * kw
    cols = cols.view(Q, K, B * Ho * Wo).transpose(1, 2)  # (Q, B*Ho*Wo, K)
    wg = w.index_select(1, index).view(Cout, Q, K).permute(1, 2, 0)  # (Q, K, Cout)
    base_m = out_base.permute(0, 2, 3, 1).reshape(1, B * Ho * Wo, Cout)
    out = torch.baddbmm(base_m, cols, wg) if bmm is None else bmm(cols, wg)  # (Q, B*Ho*Wo, Cout): NHWC per copy
    out = out.view(Q * B, Ho, Wo, Cout).permute(0, 3, 1, 2)
    if not channels_last:
        out = out.contiguous()
    return out, 2 * Q * B * Ho * Wo * K * Cout


def chan_linear(out_base, delta, w, index, Q, bmm=None):
    """cached_out + delta @ W[:, block].T per copy; delta (Q*B, s). Returns (out (Q*B, Out), FLOPs).

    ``bmm``: given, the product alone, ``bmm(delta, weights)`` (see :func:`chan_conv`).
    """
    B, s = out_base.shape[0], delta.shape[1]
    wq = w.index_select(1, index)  # (Out, Q*s)
    wq = wq.view(wq.shape[0], Q, s).permute(1, 2, 0)  # (Q, s, Out)
    out = torch.baddbmm(out_base.unsqueeze(0), delta.view(Q, B, s), wq) if bmm is None else \
        bmm(delta.view(Q, B, s), wq)
    return out.reshape(Q * B, -1), 2 * Q * B * s * wq.shape[2]


def padded_conv_input(x, mod):
    """The conv's input with its zero padding applied (what the perturbed weight multiplies)."""
    pad = mod.padding
    if pad == "valid":
        pad = (0, 0)
    elif pad == "same":
        tot = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
        return F.pad(x, (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2))
    return F.pad(x, (pad[1], pad[1], pad[0], pad[0])) if any(pad) else x


def perturbed_params(p, flat, steps):
    """Copies of ``p`` with entry flat[q] moved by steps[q] (the generic path's parameters)."""
    out = []
    for f, s in zip(flat, steps):
        t = p.detach().clone()
        t.view(-1)[f] += s
        out.append(t)
    return out


def binop(op, vals, args, rs, last, tensor_of, out_shape=None):
    """op(*vals), written into an owned operand's tensor when that operand dies here."""
    if op in (torch.add, torch.mul) or op is torch.sub:
        for i, (a, r) in enumerate(zip(args, rs)):
            if i > 0 and op is torch.sub:
                break
            if r is None or not r.own or a not in last or sum(x is a for x in args) != 1:
                continue
            v = vals[i]
            other = vals[1 - i]
            shape = out_shape if out_shape is not None else v.shape
            if tuple(v.shape) != tuple(shape) or not isinstance(v, torch.Tensor) or (
                    isinstance(other, torch.Tensor) and torch.broadcast_shapes(v.shape, other.shape) != v.shape):
                continue
            if isinstance(other, torch.Tensor) and other.dtype != v.dtype:
                continue
            return op(v, other, out=v)
    return op(*vals)


def linear_nd_entry(out_base, x, flat, steps, weight):
    """Output of Q copies of a linear layer on (B, ..., in) inputs whose weight entry flat[q]
    (``weight``; else bias entry flat[q]) moved by steps[q]: (Q*B, ..., out).

    Only output feature o changes, by step * x[..., c] (bias: by step); the rest is the
    cached output, so a copy costs one copy of the output instead of a matmul.
    """
    Q, n_in = len(flat), x.shape[-1]
    out = fresh_copies(out_base, Q)
    view = out.view(Q, *out_base.shape)
    for q, f in enumerate(flat):
        o, c = (f // n_in, f % n_in) if weight else (f, None)
        col = view[q][..., o]
        if weight:
            col.add_(x[..., c], alpha=steps[q])
        else:
            col.add_(steps[q])
    return out


def embedding_rows(out_base, tokens, rows, cols, steps):
    """Embedding output of Q copies whose table entry (rows[q], cols[q]) moved by steps[q]: (Q*B, ...).

    Only positions holding token rows[q] change, and only in feature cols[q]; the new value
    is the perturbed table entry itself, exactly what a lookup in the perturbed table gives.
    """
    Q = len(rows)
    out = fresh_copies(out_base, Q)
    view = out.view(Q, *out_base.shape)
    for q in range(Q):
        hit = tokens == rows[q]
        if bool(hit.any()):
            entry = out_base[hit][0, cols[q]] + steps[q]
            view[q][..., cols[q]][hit] = entry
    return out
