"""The work model: what one query of a plan costs, from shapes alone (never run).

:func:`plan_work` walks a plan's nodes in order and asks the rules (zohpc.zo.rules) for the
decision of each, exactly as the executor does, then adds that decision's row of the cost
table :data:`COSTS`: conv/linear FLOPs (2 x multiply-adds, per copy) and elements read or
written by the other ops. The sizes cap the copies per pass (QueryEngine.batch_size): they
depend on the plan and the input shape only, so every rank cuts the same groups; the work is
what the cost model (zohpc.zo.costs) calibrates.
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn

from .ops import BN_TYPES
from .reps import FULL, PER, is_chan
from .rules import PER_COPY, decide, decide_source, pad_args


class Work:
    """Accumulates the per-copy work of one query on the engine's cached shapes."""

    def __init__(self, g):
        self.g = g
        self.env = g.env
        self.B = g.batch
        self.flops = 0
        self.moves = 0

    def numel(self, n) -> int:
        v = self.env[n]
        return v.numel() if isinstance(v, torch.Tensor) else 0

    def chan_elems(self, n, s) -> int:
        return self.B * s * math.prod(self.env[n].shape[2:])

    def add(self, flops=0, moves=0) -> None:
        self.flops += flops
        self.moves += moves

    def materialize(self, a, r) -> None:
        if is_chan(r):
            self.add(moves=self.numel(a) + self.chan_elems(a, r[1]))

    def op(self, n) -> None:
        """An op run once on one copy (full tensors)."""
        mod = self.g.modules.get(n.target) if n.op == "call_module" else None
        out = self.numel(n)
        if isinstance(mod, nn.Conv2d):
            w = mod.weight
            self.add(2 * out * (w.numel() // w.shape[0]), out)
        elif isinstance(mod, nn.Linear):
            self.add(2 * out * mod.in_features, out)
        else:
            self.add(2 * rowwise_flops(self.g, n), out * (4 if isinstance(mod, BN_TYPES) else 1))


def rowwise_flops(g, n) -> int:
    """Matmul FLOPs of one copy of a transformer op (attention, encoder layer); 0 for others."""
    from torch.nn import functional as F
    env = g.env
    if n.op == "call_module":
        mod = g.modules[n.target]
        x = env[n.args[0]] if n.args else None
        if isinstance(mod, (nn.MultiheadAttention, nn.TransformerEncoderLayer)) and isinstance(x, torch.Tensor):
            attn = mod if isinstance(mod, nn.MultiheadAttention) else mod.self_attn
            B, T, D = x.shape[0], x.shape[1], attn.embed_dim
            f = B * T * 4 * D * D + 2 * B * T * T * D  # projections, scores and weighted sum (multiply-adds)
            if isinstance(mod, nn.TransformerEncoderLayer):
                f += 2 * B * T * D * mod.linear1.out_features
            return f
    if n.op == "call_function" and n.target is F.scaled_dot_product_attention:
        q, k = env[n.args[0]], env[n.args[1]]
        return 2 * q.numel() * k.shape[-2]
    if n.op == "call_function" and n.target is F.linear:
        w = env[n.args[1]] if isinstance(n.args[1], fx.Node) else n.args[1]
        return env[n].numel() * w.shape[-1]
    return 0


def _unary_cost(w, n, rs, d):
    a = n.args[0]
    r = rs.get(a)
    g = w.g
    out = w.numel(n)
    mod = g.modules[n.target] if n.op == "call_module" else None
    how = d.how
    if how == "conv_chan":
        s = r[1]
        K = s * mod.weight.shape[2] * mod.weight.shape[3]
        rows = out // mod.weight.shape[0]  # B * Ho * Wo
        w.add(2 * rows * K * mod.weight.shape[0], 2 * w.chan_elems(a, s) + rows * K + out * (2 if g.channels_last else 3))
    elif how == "conv_full":
        w.materialize(a, r)
        wt = mod.weight
        w.add(2 * out * (wt.numel() // wt.shape[0]), out)
    elif how == "linear_chan":
        s = r[1]
        w.add(2 * g.env[a].shape[0] * s * mod.out_features, 2 * w.chan_elems(a, s) + 2 * out)
    elif how == "linear_full":
        w.materialize(a, r)
        w.add(2 * out * mod.in_features, out)
    elif how == "bn_chan":
        w.add(moves=5 * w.chan_elems(n, r[1]))
    elif how == "bn_full":
        w.add(moves=4 * out)
    elif how == "chanwise":
        w.add(moves=w.chan_elems(a, r[1]) + w.chan_elems(n, r[1]) if is_chan(r) else w.numel(a) + out)
    elif how == "flatten_full":
        w.add(moves=out if g.channels_last and g.env[a].dim() == 4 else 0)


def _binary_cost(w, n, rs, d):
    args = n.args
    if d.how == "binary_chan":
        gathered = sum(1 for a in args if isinstance(a, fx.Node) and rs.get(a) is None)
        w.add(moves=(2 + gathered) * w.chan_elems(n, d.out[1]))
        return
    for a in args:
        if isinstance(a, fx.Node):
            w.materialize(a, rs.get(a))
    w.add(moves=2 * w.env[n].numel())


def _shape_cost(w, n, rs, d):
    a = n.args[0]
    r = rs.get(a)
    if d.how in ("getitem_mat", "pad_mat"):
        w.materialize(a, r)
    if d.how.startswith("pad"):
        w.add(moves=w.chan_elems(n, r[1]) if d.how in ("pad_chan", "pad_shift") else w.numel(n))


def _rowwise_cost(w, n, rs, d):
    for a in n.all_input_nodes:
        w.materialize(a, rs.get(a))
        if rs.get(a) is None and isinstance(w.env[a], torch.Tensor) and w.env[a].dim() > 0 \
                and w.env[a].shape[0] == w.B:
            w.add(moves=w.numel(a))  # an unchanged batch input repeated per copy
    out = w.env[n]
    w.add(2 * rowwise_flops(w.g, n), moves=(out.numel() if isinstance(out, torch.Tensor) else w.numel(n.args[0])) * 4)


def _generic_cost(w, n, rs, d):
    for a in n.all_input_nodes:
        if is_chan(rs.get(a)):
            w.add(moves=w.numel(a))  # the cached value cloned per copy
    w.op(n)


def _generic_stacked_cost(w, n, rs, d):
    _generic_cost(w, n, rs, d)
    w.add(moves=w.numel(n))  # the copies stacked


def _source_cost(w, n, rs, d):
    kind = d.how[len("source_"):]
    if kind in ("emb", "lin_w_nd", "lin_b_nd"):
        w.add(moves=2 * w.numel(n))
    elif kind in ("generic", "stacked"):
        _generic_cost(w, n, rs, d)
        if kind == "stacked":
            w.add(moves=w.numel(n))
    else:
        w.add(moves={"conv_w": 3, "lin_w": 3, "bn_w": 5}.get(kind, 2) * w.chan_elems(n, 1))


def _no_cost(w, n, rs, d):
    return None


COSTS = {"conv_chan": _unary_cost, "conv_full": _unary_cost, "linear_chan": _unary_cost,
         "linear_full": _unary_cost, "bn_chan": _unary_cost, "bn_full": _unary_cost, "chanwise": _unary_cost,
         "flatten_chan": _no_cost, "flatten_full": _unary_cost, "binary_chan": _binary_cost,
         "binary_full": _binary_cost, "binary_param": _binary_cost, "getitem_full": _no_cost,
         "getitem_chan": _no_cost, "getitem_tuple": _no_cost, "getitem_mat": _shape_cost, "pad_full": _shape_cost,
         "pad_chan": _shape_cost, "pad_shift": _shape_cost, "pad_mat": _shape_cost, "rowwise": _rowwise_cost,
         "generic": _generic_cost, "generic_stacked": _generic_stacked_cost}
"""What each decision costs per copy (the cost table): decision ``how`` -> function adding its work."""


def plan_work(g, plan) -> None:
    """Fill ``plan``'s per-copy work of one query on ``g``'s cached shapes, without running it.

    Sets ``plan.elems`` (largest stacked tensor per copy), ``flops``, ``moves``,
    ``pass_ops``/``copy_ops`` (ops dispatched once per pass / once per copy), ``reps``
    (node -> kind, what a real query's nodes take) and ``how`` (node -> the kernel path the
    executor runs: the decisions are made here, once per input shape, and only read there).
    """
    plan.elems = plan.flops = plan.moves = plan.pass_ops = plan.copy_ops = 0
    plan.reps, plan.how = {}, {}
    if not plan.reaches_loss:
        return
    w = Work(g)
    rs: dict = {}
    for n in plan.order:
        d = decide_source(g, plan, n, rs) if n in plan.sources else decide(g, n, rs)
        (_source_cost if n in plan.sources else COSTS[d.how])(w, n, rs, d)
        rs[n] = plan.reps[n] = d.out
        plan.how[n] = d.how
        if d.how in PER_COPY and n.op != "get_attr":  # (a get_attr source hands each copy its parameter)
            plan.copy_ops += 1
        else:
            plan.pass_ops += 1
        if d.out == FULL:
            v = g.env[n]
            plan.elems = max(plan.elems, w.numel(n) if isinstance(v, torch.Tensor) else
                             max((t.numel() for t in v if isinstance(t, torch.Tensor)), default=0))
        elif is_chan(d.out):
            plan.elems = max(plan.elems, w.chan_elems(n, d.out[1]))
        for a in plan.free_after.get(n, ()):
            rs.pop(a, None)
    r = rs[g.output_node]
    w.materialize(g.output_node, r)
    w.add(moves=w.numel(g.output_node) * (2 if r == PER else 1))  # the objective (+ stacking copies)
    plan.flops, plan.moves = w.flops, w.moves


__all__ = ["COSTS", "Work", "plan_work", "rowwise_flops"]
