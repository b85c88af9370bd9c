"""One rule per operation kind: a node's output representation from its inputs'.

A rule sees the abstract kinds of the node's inputs (None: unchanged, ``("chan", s, shift)``,
``"full"``, ``"per"``; see zohpc.zo.reps) and the cached shapes, and returns a
:class:`Decision`: ``how`` (the kernel path the executor runs, the row of the cost table
the work model reads) and ``out`` (the kind of the node's value in a query). The executor
(zohpc.zo.executor) and the work model (zohpc.zo.work) both call :func:`decide`, so what
is planned is what runs. Adding an operation kind means adding its rule here, its kernel
path in the executor, its difference form for the delta precision modes (zohpc.zo.delta,
which checks at import that every path has one) and its row in the cost table (zohpc.zo.work).

``g`` is the graph context (a QueryEngine): ``env`` (cached values), ``modules``, ``kind``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F

from .ops import batch_args
from .reps import FULL, PER, chan, is_chan


class Decision(NamedTuple):
    how: str
    out: object


GENERIC = Decision("generic", PER)
PER_COPY = {"generic", "generic_stacked", "source_generic", "source_stacked"}  # paths that dispatch an op once per copy


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _unary(g, n, rs):
    a = n.args[0]
    return a, rs.get(a)


def _product_rule(kind: str, takes_blocks):
    """The rule of a layer with a weight (conv, linear): its output is dense in every copy;
    a one-block input takes the incremental ``<kind>_chan`` path where ``takes_blocks(g, n, a)``."""
    def rule(g, n, rs):
        a, r = _unary(g, n, rs)
        if r is None or r == PER:
            return GENERIC
        return Decision(f"{kind}_chan" if is_chan(r) and takes_blocks(g, n, a) else f"{kind}_full", FULL)
    return rule


def _conv_takes_blocks(g, n, a) -> bool:
    mod = g.modules[n.target]
    return mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)


rule_conv = _product_rule("conv", _conv_takes_blocks)
rule_linear = _product_rule("linear", lambda g, n, a: g.env[a].dim() == 2)


def rule_bn(g, n, rs):
    a, r = _unary(g, n, rs)
    if r is None or r == PER:
        return GENERIC
    return Decision("bn_chan", r) if is_chan(r) else Decision("bn_full", FULL)


def rule_chanwise(g, n, rs):
    a, r = _unary(g, n, rs)
    if r is None or r == PER:
        return GENERIC
    return Decision("chanwise", r)


def rule_flatten(g, n, rs):
    a, r = _unary(g, n, rs)
    if r is None or r == PER:
        return GENERIC
    if is_chan(r):
        inner = 1
        for d in g.env[a].shape[2:]:
            inner *= d
        return Decision("flatten_chan", chan(r[1] * inner, r[2]))
    return Decision("flatten_full", FULL)


def _stacks_with_parameter(g, n, args, ks) -> bool:
    """One per-copy operand is a perturbed parameter read by ``get_attr`` (learned positions
    added to the embedding) and the others are unchanged or stacked tensors."""
    pers = [a for a, k in zip(args, ks) if k == PER]
    out = g.env[n]
    if len(pers) != 1 or pers[0].op != "get_attr" or not _is_tensor(out) or out.dim() == 0 \
            or out.shape[0] != g.batch or not _is_tensor(g.env[pers[0]]) or g.env[pers[0]].dim() > out.dim():
        return False
    return all(not isinstance(a, fx.Node) or a is pers[0] or (
        k in (None, FULL) and _is_tensor(g.env[a]) and (k is None or g.env[a].dim() == out.dim()))
        for a, k in zip(args, ks))


def rule_binary(g, n, rs):
    args = n.args
    ks = [rs.get(a) if isinstance(a, fx.Node) else None for a in args]
    if any(k == PER for k in ks):
        # the parameter's copies stack against the batch: one broadcast op for all copies
        return Decision("binary_param", FULL) if _stacks_with_parameter(g, n, args, ks) else GENERIC
    nodes = [a for a in args if isinstance(a, fx.Node)]
    if any(not _is_tensor(g.env[a]) for a in nodes):
        return GENERIC
    out = g.env[n]
    chans = [k for k in ks if is_chan(k)]
    if chans and FULL not in ks:
        if all(k == chans[0] for k in chans) and all(g.env[a].shape == out.shape for a in nodes):
            return Decision("binary_chan", chans[0])
        # (different blocks per operand: the engine cannot tell them apart by kind; fall through)
    if any(k is not None and g.env[a].dim() != out.dim() for a, k in zip(args, ks)):
        return GENERIC
    return Decision("binary_full", FULL)


def _static_slices(index) -> bool:
    return (isinstance(index, tuple) and len(index) >= 2 and index[0] == slice(None)
            and all(isinstance(i, slice) and all(not isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))
                    for i in index))


def rule_getitem(g, n, rs):
    a, index = n.args[0], n.args[1] if len(n.args) > 1 else None
    r = rs.get(a) if isinstance(a, fx.Node) else None
    if r is None or r == PER or n.kwargs:
        return GENERIC
    if r == FULL and isinstance(index, int) and isinstance(g.env[a], (tuple, list)):
        # an element of a module's tuple output (attention: (output, weights))
        return Decision("getitem_tuple", FULL) if _is_tensor(g.env[n]) else GENERIC
    if _static_slices(index):
        if r == FULL:
            return Decision("getitem_full", FULL)
        if index[1] == slice(None):
            return Decision("getitem_chan", r)
        return Decision("getitem_mat", FULL)
    return GENERIC


def pad_args(n):
    pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
    mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
    return pad, mode


def rule_pad(g, n, rs):
    a = n.args[0]
    r = rs.get(a) if isinstance(a, fx.Node) else None
    pad, mode = pad_args(n)
    if r is None or r == PER or isinstance(pad, fx.Node) or any(isinstance(p, fx.Node) for p in pad):
        return GENERIC
    nd = g.env[a].dim()
    if len(pad) // 2 <= nd - 1 and r == FULL:
        return Decision("pad_full", FULL)
    if r != FULL and min(pad) >= 0:
        if len(pad) // 2 <= nd - 2:
            return Decision("pad_chan", r)
        if len(pad) // 2 == nd - 1 and mode == "constant" and pad[-2] % r[1] == 0:
            return Decision("pad_shift", chan(r[1], r[2] + pad[-2] // r[1]))
    if len(pad) // 2 <= nd - 1:
        return Decision("pad_mat", FULL)
    return GENERIC


def _batch_dim_ok(g, n) -> bool:
    """Literal reduction/softmax dims never name the batch dim of the node's input."""
    if n.op == "call_module" or n.target in (F.scaled_dot_product_attention, F.layer_norm, F.linear):
        return True
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    if dims is None:
        return True  # modules (their dims were checked by classify) and attention
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    nd = g.env[n.args[0]].dim()
    return all(d % nd != 0 for d in dims)


def _keeps_dim0(g, n) -> bool:
    """A reshape-kind method that leaves dim 0 (the batch) where it is and each sample whole:
    ``view``/``reshape`` whose first size is a literal -1 (and the batch size stays first),
    ``transpose``/``permute`` that never move dim 0, ``chunk``/``split`` along another dim."""
    x, rest = n.args[0], n.args[1:]
    nd = g.env[x].dim() if _is_tensor(g.env.get(x)) else 0
    if nd < 2:
        return False
    t = n.target
    if t in ("view", "reshape"):
        sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        out = g.env[n]
        return (not n.kwargs and len(sizes) > 1 and sizes[0] == -1 and _is_tensor(out) and out.dim() > 1
                and out.shape[0] == g.env[x].shape[0])
    if t == "transpose":
        dims = list(rest) + [n.kwargs.get(k) for k in ("dim0", "dim1") if k in n.kwargs]
        return len(dims) == 2 and all(isinstance(d, int) and d % nd != 0 for d in dims)
    if t == "permute":
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
        return not n.kwargs and len(dims) == nd and all(isinstance(d, int) for d in dims) and dims[0] % nd == 0
    if t == "unflatten":
        dim = rest[0] if rest else n.kwargs.get("dim")
        return isinstance(dim, int) and dim % nd != 0
    if t == "flatten":
        start = rest[0] if rest else n.kwargs.get("start_dim", 0)
        return isinstance(start, int) and start % nd != 0
    if t in ("chunk", "split"):
        dim = rest[1] if len(rest) > 1 else n.kwargs.get("dim", 0)
        return isinstance(dim, int) and dim % nd != 0 and isinstance(rest[0] if rest else None, int)
    return False


def rule_reshape(g, n, rs):
    """Per-sample rearrangements: run once on the stacked copies (a one-channel input is
    materialized first); anything that could touch the batch dim goes copy by copy. A
    ``view``/``reshape`` to (batch, everything else) is a flatten: its rule keeps one channel."""
    if not _keeps_dim0(g, n):
        return GENERIC
    x, out = g.env[n.args[0]], g.env[n]
    if n.target in ("view", "reshape") and x.dim() > 2 and _is_tensor(out) and out.dim() == 2:
        return rule_flatten(g, n, rs)
    return _stacked(g, n, rs)


def rule_rowwise(g, n, rs):
    """Ops whose sample i depends only on input sample i: run once on the stacked copies."""
    if not _batch_dim_ok(g, n):
        return GENERIC
    return _stacked(g, n, rs)


def _stacked(g, n, rs):
    B = g.batch
    carry = batch_args(n, g.modules)
    items = list(enumerate(n.args)) + list(n.kwargs.items())
    for key, a in items:
        if not isinstance(a, fx.Node):
            continue
        k = rs.get(a)
        if k == PER:
            return GENERIC
        v = g.env[a]
        if key in carry:
            if not _is_tensor(v) or v.dim() == 0 or v.shape[0] != B:
                return GENERIC
        elif k is not None or (_is_tensor(v) and v.dim() >= 3 and v.shape[0] == B and B > 1):
            return GENERIC  # a perturbed or batch-shaped side input (mask): copy by copy
    out = g.env[n]
    ok_out = _is_tensor(out) and out.dim() > 0 and out.shape[0] == B
    ok_out = ok_out or (isinstance(out, tuple) and _is_tensor(out[0]) and out[0].shape[0] == B)
    if not ok_out:
        return GENERIC
    return Decision("rowwise", FULL)


RULES = {"conv": rule_conv, "linear": rule_linear, "bn": rule_bn, "chanwise": rule_chanwise,
         "flatten": rule_flatten, "binary": rule_binary, "getitem": rule_getitem, "pad": rule_pad,
         "rowwise": rule_rowwise, "reshape": rule_reshape}


def _reads_parameter_copies(g, n, rs) -> bool:
    """A node that reads a perturbed parameter's copies (a ``get_attr`` source: ``F.linear``
    of a bare weight) and has a batch-shaped tensor value: run copy by copy, then stacked."""
    out = g.env[n]
    if not _is_tensor(out) or out.dim() == 0 or out.shape[0] != g.batch:
        return False
    per = [a for a in n.all_input_nodes if rs.get(a) == PER]
    return bool(per) and all(a.op == "get_attr" for a in per)


def decide(g, n, rs) -> Decision:
    """The decision for downstream node ``n`` given the kinds ``rs`` (node -> kind) of a query."""
    rule = RULES.get(g.kind[n])
    d = rule(g, n, rs) if rule is not None else GENERIC
    if d is GENERIC and _reads_parameter_copies(g, n, rs):
        return Decision("generic_stacked", FULL)  # (the copies stacked again: what follows runs once)
    return d


# sources: the node that consumes the perturbed parameter

_STACKABLE_SOURCES = {"rowwise", "embedding"}  # kinds whose per-copy outputs stack along dim 0


def decide_source(g, plan, n, rs) -> Decision:
    """The decision for a consumer node of the perturbed parameter."""
    incremental = plan.kind != "generic" and all(a not in rs for a in n.all_input_nodes)
    out = g.env[n]
    if incremental:
        if plan.kind in ("lin_w", "lin_b") and out.dim() != 2:
            if out.dim() > 2 and out.shape[0] == g.batch and n.op == "call_module":
                return Decision(f"source_{plan.kind}_nd", FULL)  # (B, ..., out): one output feature moves
            incremental = False
        elif plan.kind == "emb_w":
            if _is_tensor(out) and out.dim() > 0 and out.shape[0] == g.batch:
                return Decision("source_emb", FULL)
            incremental = False
        else:
            return Decision("source_" + plan.kind, chan(1))
    if (g.kind[n] in _STACKABLE_SOURCES or plan.kind in ("lin_w", "lin_b")):
        first = out[0] if isinstance(out, tuple) and out else out
        if _is_tensor(first) and first.dim() > 0 and first.shape[0] == g.batch and n.op == "call_module" \
                and all(rs.get(a) is None for a in n.all_input_nodes):
            return Decision("source_stacked", FULL)
    return Decision("source_generic", PER)


__all__ = ["Decision", "GENERIC", "PER_COPY", "RULES", "decide", "decide_source", "pad_args"]
