"""Plans: what a query of one parameter re-runs (graph analysis, no tensors).

A plan lists the consumer nodes of the parameter (its sources), every node downstream of
them in graph order, and when each intermediate value can be dropped. ``kind`` names the
incremental rule of the source (conv_w, conv_b, lin_w, lin_b, bn_w, bn_b, emb_w) or
``generic`` (the consumer is run with the perturbed parameter, copy by copy).
"""

from __future__ import annotations

import torch.fx as fx


class Plan:
    """What a query of one parameter re-runs, and its work (filled by zohpc.zo.work.plan_work)."""

    def __init__(self):
        self.kind = "none"  # conv_w conv_b lin_w lin_b bn_w bn_b emb_w generic none
        self.sources: set = set()
        self.order: list = []  # nodes to evaluate, graph order (sources included)
        self.free_after: dict = {}  # node -> nodes whose reps can be dropped after it
        self.rel_name = ""  # parameter name relative to the consumer module (generic override)
        self.reaches_loss = False
        # per-copy work of one query on the current input shape (see zohpc.zo.work.plan_work)
        self.elems = None  # largest stacked tensor (elements): caps the copies per pass
        self.flops = 0  # 2 x multiply-adds of convs and linears
        self.moves = 0  # elements read or written by the other ops
        self.pass_ops = 0  # ops dispatched once per stacked pass
        self.copy_ops = 0  # ops dispatched once per copy (ops the engine runs copy by copy)
        self.reps: dict = {}  # node -> kind its query value takes (tests compare with real queries)
        self.how: dict = {}  # node -> the decision's kernel path (zohpc.zo.rules), what the executor runs


_INCREMENTAL = {"conv": {"weight": "conv_w", "bias": "conv_b"}, "linear": {"weight": "lin_w", "bias": "lin_b"},
                "bn": {"weight": "bn_w", "bias": "bn_b"}, "embedding": {"weight": "emb_w"}}


def make_plan(nodes: list, pos: dict, kinds: dict, modules: dict, output_node: fx.Node, pname: str) -> Plan:
    """The plan of parameter ``pname`` in the traced graph (``nodes`` in order, ``pos`` their index)."""
    plan = Plan()
    mod_path, _, attr = pname.rpartition(".")
    consumers = []
    for n in nodes:
        if n.op == "get_attr" and n.target == pname:
            consumers.append((n, ""))
        elif n.op == "call_module":
            t = n.target
            if t == mod_path:
                consumers.append((n, attr))
            elif mod_path.startswith(t + ".") or t == "":
                consumers.append((n, pname[len(t) + 1:] if t else pname))
    if not consumers:
        return plan
    plan.sources = {n for n, _ in consumers}
    plan.rel_name = consumers[0][1]
    if len(consumers) == 1 and consumers[0][1] == attr:
        n = consumers[0][0]
        mod = modules.get(n.target)
        kind = _INCREMENTAL.get(kinds[n], {}).get(attr, "none")
        if kind == "conv_w" and mod.padding_mode != "zeros":
            kind = "none"
        if kind == "none" and kinds[n] in ("linear", "bn"):
            kind = "generic"
        plan.kind = kind
    if plan.kind == "none":
        plan.kind = "generic"
    seen = set(plan.sources)
    stack = list(plan.sources)
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op != "output" and u not in seen:
                seen.add(u)
                stack.append(u)
    plan.order = sorted(seen, key=pos.__getitem__)
    plan.reaches_loss = output_node in seen
    last = {}
    for n in plan.order:
        for a in n.all_input_nodes:
            if a in seen:
                last[a] = n
    for a, n in last.items():
        if a is not output_node:
            plan.free_after.setdefault(n, []).append(a)
    return plan


__all__ = ["Plan", "make_plan"]
