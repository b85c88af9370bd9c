"""The ZO query engine: loss values f(theta + step * e_k) for many coordinates k, fast.

How (DESIGN.md, "feature reuse" and "incremental first layer", done per layer for any model):

* The model is traced once with torch.fx into a graph of ops. ``prepare`` runs one
  unperturbed forward and caches every intermediate value.
* A query perturbs one scalar of one parameter P. Only the nodes downstream of P's consumer
  are re-run; every other input is read from the cache (e.g. residual shortcuts).
* Perturbed values travel in one of three representations ("reps"), for Q stacked copies:
  - ``_Chan``: the cached tensor with one block of channels (dim 1) replaced per copy. A
    perturbed conv/linear/BN parameter changes exactly one output channel, and BatchNorm,
    ReLU, pooling, flatten, slicing, padding and adding an unchanged tensor keep it that way.
    A conv reading a ``_Chan`` input computes ``cached_out + conv(delta, W[:, block])``
    (im2col of the one-channel delta times a (kh*kw, Cout) weight slice per copy, one batched
    matmul) instead of the full conv; a linear layer likewise.
  - ``_Full``: all values changed; the Q copies are stacked along dim 0 (Q*B, ...), so one
    batched op serves all copies. BatchNorm uses per-copy batch statistics.
  - ``_Per``: a list of Q values, for ops the engine does not know; each copy is run by
    calling the op itself (correct for any op, slow).
* The perturbed layer itself is incremental: W[o, c, i, j] += s changes output channel o by
  s times a shifted slice of input channel c; a bias or a BatchNorm weight/bias by s or
  s * x_hat.
* The model's output, stacked (Q*B, ...), goes through the task's objective
  (:class:`~zohpc.zo.objective.Objective`: Q loss values; a black box is called per copy).
  Targets may have any shape and dtype; the engine only hands them to the objective.
* Which representation every node of a plan takes is decided from shapes alone when the
  input shape is first seen (``_plan_work``): it fixes the copies per pass and gives the
  work of a query that the cost model (zohpc.zo.costs) calibrates.

The parameters are never modified; queries are functional. BatchNorm always uses batch
statistics of each copy (training-mode semantics) and never touches running statistics.
Nothing process-wide is changed: a run's set-up calls :func:`tune_malloc` itself.

CPU performance notes (measured, see zohpc.bench.engine): activations are kept channels-last
(oneDNN convs 1.5-3x faster), glibc should recycle large blocks (tune_malloc), the stacked
copies per pass are capped so tensors stay cache-sized (max_elements), tensors that die at a
ReLU or an addition are updated in place, and a few ATen CPU kernels that are slow for these
shapes are replaced by exact equivalents (strided max-pool, Welford-free stats).
"""

from __future__ import annotations

import math
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from ..errors import ConfigError
from ..inputs import model_input
from ..sharding import largest_divisor
from ..stop import no_check
from .objective import Objective

# ---------------------------------------------------------------------------------------
# determinism check

_RANDOM_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.FeatureAlphaDropout, nn.RReLU)
_RANDOM_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout, F.rrelu, torch.dropout, torch.bernoulli, torch.rand,
                     torch.randn, torch.randint, torch.randperm, torch.rand_like, torch.randn_like,
                     torch.randint_like, torch.normal, torch.multinomial, torch.poisson}
_RANDOM_METHODS = {"bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_"}


class NondeterministicModelError(ConfigError):
    """The model's forward pass is random (dropout, ...): ZO finite differences need f fixed."""


def check_deterministic(model: nn.Module) -> None:
    """Raise NondeterministicModelError naming the first random module; dropout with p = 0 is
    an identity and is accepted (PyTorch's transformer layers always hold Dropout modules).

    Policy: active dropout is refused with one line saying how to turn it off (p = 0), never
    switched off silently: a forward that differs between queries makes finite differences noise.
    """
    for name, mod in model.named_modules():
        if isinstance(mod, _RANDOM_MODULES) and not getattr(mod, "p", None) == 0:
            raise NondeterministicModelError(
                f"model module {name!r} ({type(mod).__name__}"
                + (f", p={mod.p}" if hasattr(mod, "p") else "") + ") is random; zeroth-order training "
                f"needs a deterministic forward pass: build it with p=0 (e.g. dropout=0.0 in "
                f"nn.TransformerEncoderLayer) or remove it")


_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
                      torch.dropout}


def _zero_dropout(n: fx.Node) -> bool:
    """A functional dropout call whose probability is the constant 0 (an identity)."""
    if n.target not in _DROPOUT_FUNCTIONS:
        return False
    p = n.kwargs.get("p", n.args[1] if len(n.args) > 1 else 0.5)
    return isinstance(p, (int, float)) and p == 0


def _check_graph_deterministic(graph: fx.Graph) -> None:
    for n in graph.nodes:
        if (n.op == "call_function" and n.target in _RANDOM_FUNCTIONS and not _zero_dropout(n)) or (
                n.op == "call_method" and n.target in _RANDOM_METHODS):
            raise NondeterministicModelError(
                f"model forward calls random op {getattr(n.target, '__name__', n.target)!r} "
                f"(node {n.name}); zeroth-order training needs a deterministic forward pass")


# ---------------------------------------------------------------------------------------
# op classification

_CHANWISE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                     nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Identity,
                     nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d,
                     nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
                     nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CHANWISE_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                       torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardtanh, F.hardswish,
                       F.mish, F.softplus, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d,
                       F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                       F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
                       F.adaptive_max_pool3d}
_CHANWISE_METHODS = {"relu", "sigmoid", "tanh"}
_BINARY = {operator.add: torch.add, operator.iadd: torch.add, torch.add: torch.add,
           operator.sub: torch.sub, operator.isub: torch.sub, torch.sub: torch.sub,
           operator.mul: torch.mul, operator.imul: torch.mul, torch.mul: torch.mul,
           operator.truediv: torch.div, operator.itruediv: torch.div, torch.div: torch.div}
_BINARY_METHODS = {"add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div}
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Chan:
    """Cached tensor with block ``idx[q]`` (channels idx*s .. idx*s+s-1 of dim 1) replaced."""

    __slots__ = ("idx", "s", "v", "idx_t", "own")

    def __init__(self, idx, s, v, idx_t=None, own=False):
        self.idx, self.s, self.v, self.idx_t, self.own = list(idx), int(s), v, idx_t, own


class _Full:
    """Q copies stacked along dim 0. ``own``: the tensor is ours alone (may be updated in place)."""

    __slots__ = ("t", "own")

    def __init__(self, t, own=False):
        self.t, self.own = t, own


class _Per:
    __slots__ = ("vals",)

    def __init__(self, vals):
        self.vals = vals


class _Plan:
    """What a query of one parameter re-runs."""

    def __init__(self):
        self.kind = "none"  # conv_w conv_b lin_w lin_b bn_w bn_b generic none
        self.sources: set = set()
        self.order: list = []  # nodes to evaluate, graph order (sources included)
        self.free_after: dict = {}  # node -> nodes whose reps can be dropped after it
        self.rel_name = ""  # parameter name relative to the consumer module (generic override)
        self.reaches_loss = False
        # per-copy work of one query on the current input shape (see QueryEngine._plan_work)
        self.elems = None  # largest stacked tensor (elements): caps the copies per pass
        self.flops = 0  # 2 x multiply-adds of convs and linears
        self.moves = 0  # elements read or written by the other ops
        self.pass_ops = 0  # ops dispatched once per stacked pass
        self.copy_ops = 0  # ops dispatched once per copy (ops the engine runs copy by copy)
        self.reps: dict = {}  # node -> representation its query value takes (tests compare with real queries)


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Let glibc keep and reuse freed blocks up to 32 MiB instead of mmap/munmap-ing them.

    Query passes allocate and free many activation-sized tensors; with glibc's defaults each
    large one is a fresh mmap whose first touch page-faults, which costs more than the
    arithmetic (measured 2-4 ns per element vs 0.2-0.6). Process-wide, idempotent; a no-op
    where glibc is not the allocator. Never called by the engine: a run's set-up (or a
    benchmark) calls it visibly. Returns whether the setting was applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util
        import sys
        if not sys.platform.startswith("linux"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, 32 * 1024 * 1024) == 1  # M_MMAP_THRESHOLD: 32 MiB (the maximum)
        ok = (libc.mallopt(-1, 1024 * 1024 * 1024) == 1) and ok  # M_TRIM_THRESHOLD: 1 GiB
        _MALLOC_TUNED = ok
        return ok
    except (OSError, AttributeError):
        return False


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _simple_maxpool(mod) -> bool:
    """MaxPool2d with non-overlapping windows (kernel == stride, no padding/dilation)."""
    return (type(mod) is nn.MaxPool2d and not mod.return_indices and _pair(mod.kernel_size) == _pair(mod.stride)
            and _pair(mod.padding) == (0, 0) and _pair(mod.dilation) == (1, 1))


def _maxpool_strided(x, kernel):
    """Exact max pooling of non-overlapping windows as an elementwise max of strided views.

    2-8x faster than ATen's CPU max_pool2d for the small maps here; ceil_mode windows
    are handled by padding with -inf (with no padding they always start inside the input).
    """
    kh, kw = kernel
    H, W = x.shape[-2:]
    ph, pw = (-H) % kh, (-W) % kw
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=float("-inf"))
    out = None
    for i in range(kh):
        for j in range(kw):
            v = x[..., i::kh, j::kw]
            out = v.clone() if out is None else torch.maximum(out, v, out=out)
    return out


def _is_tensor(v) -> bool:
    return isinstance(v, torch.Tensor)


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------


class QueryEngine:
    """Batched, per-layer-incremental loss queries for coordinate perturbations of ``model``.

    ``objective``: an :class:`~zohpc.zo.objective.Objective` (one loss per stacked copy, any
    targets); None: mean cross entropy to class labels. It is the tail of every query.
    ``query_batch``: at most this many perturbed copies are stacked into one batched pass.
    ``max_elements``: and fewer if the largest stacked intermediate tensor of a parameter's
    plan would exceed this many elements (default 2**22 on CPU, where cache-sized tensors are
    fastest, 2**27 on GPUs). Found per parameter from the plan and the input shape.
    ``channels_last``: keep 4-D activations in NHWC memory order (values are unaffected; oneDNN
    convolutions run 1.5-3x faster on it). The model's parameters are never touched.
    ``check``: called between stacked passes; a stop request makes it raise
    :class:`~zohpc.stop.StepAbandoned` (the engine stays usable: prepare again).

    Raises ConfigError with a one-line reason when the model cannot be planned (torch.fx
    cannot trace it, or its forward is not ``forward(x) -> one tensor``); callers then fall
    back to full forward passes.
    """

    def __init__(self, model: nn.Module, objective: Objective | None = None, *, query_batch: int = 32,
                 max_elements: int | None = None, channels_last: bool = True):
        check_deterministic(model)
        if int(query_batch) < 1:
            raise ConfigError(f"config key 'zo.query_batch': must be >= 1, got {query_batch}")
        if objective is not None and not isinstance(objective, Objective):
            raise TypeError(f"objective must be a zohpc.zo.Objective or None, got {type(objective).__name__}")
        self.model = model
        self.query_batch = int(query_batch)
        self.objective = objective if objective is not None else Objective()
        self.check = no_check
        first = next(iter(model.parameters()), None)
        name = type(model).__name__
        if first is None:
            raise ConfigError(f"model {name} has no parameters")
        on_gpu = first.device.type != "cpu"
        self.max_elements = int(max_elements) if max_elements else (2 ** 27 if on_gpu else 2 ** 22)
        self.channels_last = bool(channels_last)
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is a model the engine cannot plan
            raise ConfigError(f"torch.fx cannot trace model {name}: {_first_line(exc)}") from None
        self.graph = gm.graph
        _check_graph_deterministic(self.graph)
        self.nodes = list(self.graph.nodes)
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ConfigError(f"model {name}: forward takes {len(placeholders)} inputs (the engine "
                              f"needs forward(x) with one)")
        self.input_node = placeholders[0]
        outs = [n for n in self.nodes if n.op == "output"]
        self.output_node = outs[0].args[0]
        if not isinstance(self.output_node, fx.Node) or self.output_node.op == "placeholder":
            raise ConfigError(f"model {name}: forward returns {type(self.output_node).__name__} "
                              f"(the engine needs one tensor computed from the input)")
        self.modules = dict(model.named_modules())
        self.kind = {n: self._classify(n) for n in self.nodes}
        named = list(model.named_parameters())
        self.param_names = [pname for pname, _ in named]
        self.params = [p for _, p in named]
        self.plans = [self._make_plan(pname) for pname in self.param_names]
        self.env: dict | None = None
        self.y = None
        self.base = None
        self._bn_stats: dict = {}
        self._xpad: dict = {}
        self._feat_nodes = None
        self._in_shape = None
        self.flops = 0  # matmul-type FLOPs executed by queries (conv/linear), see bench
        self.last_elems = 0  # largest stacked tensor per copy of the last query (tests the plan's work)

    # ---- planning ------------------------------------------------------------------

    def _classify(self, n: fx.Node) -> str:
        if n.op == "call_module":
            mod = self.modules[n.target]
            simple = len(n.args) == 1 and not n.kwargs
            if isinstance(mod, nn.Conv2d) and simple:
                return "conv"
            if isinstance(mod, nn.Linear) and simple:
                return "linear"
            if isinstance(mod, _BN_TYPES) and simple:
                return "bn"
            if isinstance(mod, _CHANWISE_MODULES) and simple and not getattr(mod, "return_indices", False):
                return "chanwise"
            if isinstance(mod, nn.Flatten) and simple and mod.start_dim == 1 and mod.end_dim == -1:
                return "flatten"
            return "generic"
        if n.op == "call_function":
            t = n.target
            if t in _CHANWISE_FUNCTIONS and not n.kwargs.get("return_indices", False):
                return "chanwise"
            if t is torch.flatten and len(n.args) == 2 and n.args[1] == 1 and not n.kwargs:
                return "flatten"
            if t in _BINARY and len(n.args) == 2 and not n.kwargs:
                return "binary"
            if t is operator.getitem:
                return "getitem"
            if t is F.pad:
                return "pad"
            return "generic"
        if n.op == "call_method":
            if n.target in _CHANWISE_METHODS and len(n.args) == 1 and not n.kwargs:
                return "chanwise"
            if n.target == "flatten" and len(n.args) == 2 and n.args[1] == 1 and not n.kwargs:
                return "flatten"
            if n.target in _BINARY_METHODS and len(n.args) == 2 and not n.kwargs:
                return "binary"
            return "generic"
        return n.op  # placeholder, get_attr, output

    def _make_plan(self, pname: str) -> _Plan:
        plan = _Plan()
        mod_path, _, attr = pname.rpartition(".")
        consumers = []
        for n in self.nodes:
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
            k, mod = self.kind[n], self.modules.get(n.target)
            if k == "conv":
                if attr == "weight" and mod.padding_mode == "zeros":
                    plan.kind = "conv_w"
                elif attr == "bias":
                    plan.kind = "conv_b"
            elif k == "linear":
                plan.kind = {"weight": "lin_w", "bias": "lin_b"}.get(attr, "generic")
            elif k == "bn":
                plan.kind = {"weight": "bn_w", "bias": "bn_b"}.get(attr, "generic")
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
        plan.order = sorted(seen, key=self.pos.__getitem__)
        plan.reaches_loss = self.output_node in seen
        last = {}
        for n in plan.order:
            for a in n.all_input_nodes:
                if a in seen:
                    last[a] = n
        for a, n in last.items():
            if a is not self.output_node:
                plan.free_after.setdefault(n, []).append(a)
        return plan

    # ---- work of a query, from shapes alone -------------------------------------------

    def _plan_work(self, plan: _Plan) -> None:
        """Per-copy work of one query of ``plan`` on the cached shapes, without running it.

        Follows query() and _step() op by op, choosing the same representation for every
        node (None, ("chan", s, shift), "full", "per") from shapes alone. The sizes cap the
        copies per pass (batch_size): they depend on the plan and the input shape only, so
        every rank cuts the same groups (bit-identical gradients); the work is what the
        cost model (zohpc.zo.costs) calibrates. tests/test_costs.py checks the sizes against
        real queries.
        """
        plan.elems = plan.flops = plan.moves = plan.pass_ops = plan.copy_ops = 0
        plan.reps = {}
        if not plan.reaches_loss:
            return
        env = self.env
        B = env[self.input_node].shape[0]
        sim: dict = {}
        tot = {"flops": 0, "moves": 0}

        def numel(n):
            return env[n].numel() if _is_tensor(env[n]) else 0

        def chan_elems(n, s):
            return B * s * math.prod(env[n].shape[2:])

        def add(flops=0, moves=0):
            tot["flops"] += flops
            tot["moves"] += moves

        def materialize(a, r):
            if isinstance(r, tuple):
                add(moves=numel(a) + chan_elems(a, r[1]))

        def op_work(n):
            """An op run once on one copy (full tensors)."""
            mod = self.modules.get(n.target) if n.op == "call_module" else None
            out = numel(n)
            if isinstance(mod, nn.Conv2d):
                w = mod.weight
                add(2 * out * (w.numel() // w.shape[0]), out)
            elif isinstance(mod, nn.Linear):
                add(2 * out * mod.in_features, out)
            else:
                add(moves=out * (4 if isinstance(mod, _BN_TYPES) else 1))

        def generic(n):
            for a in n.all_input_nodes:
                if isinstance(sim.get(a), tuple):
                    add(moves=numel(a))  # the cached value cloned per copy
            op_work(n)
            return "per"

        for n in plan.order:
            if n in plan.sources:
                r = None
                if plan.kind != "generic" and all(a not in sim for a in n.all_input_nodes):
                    r = self._source_work(plan, n, chan_elems, add)
                if r is None:
                    r = generic(n)
            else:
                r = self._step_work(n, sim, numel, chan_elems, add, materialize, generic)
            sim[n] = plan.reps[n] = r
            if r == "per":
                plan.copy_ops += 1
            else:
                plan.pass_ops += 1
            if r == "full":
                plan.elems = max(plan.elems, numel(n))
            elif isinstance(r, tuple):
                plan.elems = max(plan.elems, chan_elems(n, r[1]))
            for a in plan.free_after.get(n, ()):
                sim.pop(a, None)
        r = sim[self.output_node]
        materialize(self.output_node, r)
        add(moves=numel(self.output_node) * (2 if r == "per" else 1))  # the objective (+ stacking copies)
        plan.flops, plan.moves = tot["flops"], tot["moves"]

    def _source_work(self, plan, n, chan_elems, add):
        """Rep and work of the incremental perturbed layer (see _source), or None if it is generic."""
        out = self.env[n]
        if plan.kind in ("lin_w", "lin_b") and out.dim() != 2:
            return None
        e = chan_elems(n, 1)
        add(moves={"conv_w": 3, "lin_w": 3, "bn_w": 5}.get(plan.kind, 2) * e)
        return ("chan", 1, 0)

    def _step_work(self, n, sim, numel, chan_elems, add, materialize, generic):
        """Rep and work of a downstream node: the decisions of _step, _binary, _getitem, _pad."""
        k = self.kind[n]
        env = self.env
        if k in ("conv", "linear", "bn", "chanwise", "flatten"):
            a = n.args[0]
            r = sim.get(a)
            if r is None or r == "per":
                return generic(n)
            chan = isinstance(r, tuple)
            mod = self.modules[n.target] if n.op == "call_module" else None
            out = numel(n)
            if k == "conv":
                if chan and mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
                    s = r[1]
                    K = s * mod.weight.shape[2] * mod.weight.shape[3]
                    rows = out // mod.weight.shape[0]  # B * Ho * Wo
                    add(2 * rows * K * mod.weight.shape[0],
                        2 * chan_elems(a, s) + rows * K + out * (2 if self.channels_last else 3))
                    return "full"
                materialize(a, r)
                w = mod.weight
                add(2 * out * (w.numel() // w.shape[0]), out)
                return "full"
            if k == "linear":
                if chan and env[a].dim() == 2:
                    s = r[1]
                    add(2 * env[a].shape[0] * s * mod.out_features, 2 * chan_elems(a, s) + 2 * out)
                    return "full"
                materialize(a, r)
                add(2 * out * mod.in_features, out)
                return "full"
            if k == "bn":
                add(moves=5 * chan_elems(n, r[1]) if chan else 4 * out)
                return r
            if k == "chanwise":
                add(moves=chan_elems(a, r[1]) + chan_elems(n, r[1]) if chan else numel(a) + out)
                return r
            # flatten
            if chan:
                return ("chan", r[1] * math.prod(env[a].shape[2:]), r[2])
            add(moves=out if self.channels_last and env[a].dim() == 4 else 0)
            return "full"
        if k == "binary":
            return self._binary_work(n, sim, numel, chan_elems, add, materialize, generic)
        if k == "getitem":
            a, index = n.args[0], n.args[1] if len(n.args) > 1 else None
            r = sim.get(a) if isinstance(a, fx.Node) else None
            if (r is not None and r != "per" and not n.kwargs and isinstance(index, tuple) and len(index) >= 2
                    and all(isinstance(i, slice) and all(not isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))
                            for i in index) and index[0] == slice(None)):
                if r == "full" or index[1] == slice(None):
                    return r
                materialize(a, r)
                return "full"
            return generic(n)
        if k == "pad":
            a = n.args[0]
            r = sim.get(a) if isinstance(a, fx.Node) else None
            pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
            mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
            if r is None or r == "per" or isinstance(pad, fx.Node) or any(isinstance(p, fx.Node) for p in pad):
                return generic(n)
            nd = env[a].dim()
            if len(pad) // 2 <= nd - 1 and r == "full":
                add(moves=numel(n))
                return "full"
            if r != "full" and min(pad) >= 0:
                if len(pad) // 2 <= nd - 2:
                    add(moves=chan_elems(n, r[1]))
                    return r
                if len(pad) // 2 == nd - 1 and mode == "constant" and pad[-2] % r[1] == 0:
                    add(moves=chan_elems(n, r[1]))
                    return ("chan", r[1], r[2] + pad[-2] // r[1])
            if len(pad) // 2 <= nd - 1:
                materialize(a, r)
                add(moves=numel(n))
                return "full"
            return generic(n)
        return generic(n)

    def _binary_work(self, n, sim, numel, chan_elems, add, materialize, generic):
        args = n.args
        rs = [sim.get(a) if isinstance(a, fx.Node) else None for a in args]
        if any(r == "per" for r in rs):
            return generic(n)
        nodes = [a for a in args if isinstance(a, fx.Node)]
        if any(not _is_tensor(self.env[a]) for a in nodes):
            return generic(n)
        out = self.env[n]
        chans = [r for r in rs if isinstance(r, tuple)]
        if chans and "full" not in rs:
            same = all(r == chans[0] for r in chans)
            if same and all(self.env[a].shape == out.shape for a in nodes):
                gathered = sum(1 for a, r in zip(args, rs) if isinstance(a, fx.Node) and r is None)
                add(moves=(2 + gathered) * chan_elems(n, chans[0][1]))
                return chans[0]
        if any(r is not None and self.env[a].dim() != out.dim() for a, r in zip(args, rs)):
            return generic(n)
        for a, r in zip(args, rs):
            materialize(a, r)
        add(moves=2 * out.numel())
        return "full"

    # ---- base forward ---------------------------------------------------------------

    @staticmethod
    def _bn(x, eps, w, b, Q, apply=True):
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

    def _bn_stats_of(self, mod, x):
        return self._bn(x, mod.eps, None, None, 1, apply=False)[1:]

    def _call(self, n, args, kwargs, override=None):
        """Run node ``n`` on concrete values (one copy). ``override``: (rel_name, tensor)."""
        if n.op == "get_attr":
            if override is not None:
                return override[1]
            obj = self.model
            for part in n.target.split("."):
                obj = getattr(obj, part)
            return obj
        if n.op == "call_module":
            mod = self.modules[n.target]
            if self.kind[n] == "bn" or isinstance(mod, _BN_TYPES):
                w, b = mod.weight, mod.bias
                if override is not None:
                    if override[0] == "weight":
                        w = override[1]
                    else:
                        b = override[1]
                return self._bn(args[0], mod.eps, w, b, 1)[0]
            if self.kind[n] == "chanwise" and _simple_maxpool(mod) and _is_tensor(args[0]) and args[0].dim() == 4:
                H, W = args[0].shape[-2:]
                k = _pair(mod.kernel_size)
                if mod.ceil_mode or (H % k[0] == 0 and W % k[1] == 0):
                    return _maxpool_strided(args[0], k)
            if getattr(mod, "inplace", False):
                args = tuple(a.clone() if _is_tensor(a) else a for a in args)
            if override is not None:
                return torch.func.functional_call(mod, {override[0]: override[1]}, args, kwargs)
            return mod(*args, **kwargs)
        if n.op == "call_function":
            if n.target in _BINARY:
                return _BINARY[n.target](*args, **kwargs)
            if kwargs.get("inplace", False):
                kwargs = dict(kwargs, inplace=False)
            return n.target(*args, **kwargs)
        if n.op == "call_method":
            if n.target.endswith("_") and _is_tensor(args[0]):
                args = (args[0].clone(),) + tuple(args[1:])
            return getattr(args[0], n.target)(*args[1:], **kwargs)
        raise RuntimeError(f"cannot run node {n.op}")

    @torch.no_grad()
    def _forward_cache(self, x):
        env = {}
        for n in self.nodes:
            if n.op == "placeholder":
                env[n] = x
            elif n.op == "output":
                continue
            else:
                args = map_arg(n.args, env.__getitem__)
                kwargs = map_arg(n.kwargs, env.__getitem__)
                env[n] = self._call(n, args, kwargs)
        return env

    def _derive(self):
        """Values derived from the cache (BN statistics, each plan's work); same for prepare and load_features."""
        shape = tuple(self.env[self.input_node].shape)
        if shape != self._in_shape:  # tensor sizes per copy depend on the input shape only
            self._in_shape = shape
            for plan in self.plans:
                self._plan_work(plan)
        self._bn_stats = {}
        self._xpad = {}
        for n in self.nodes:
            if self.kind[n] == "bn":
                self._bn_stats[n] = self._bn_stats_of(self.modules[n.target], self.env[n.args[0]])

    def _targets(self, y):
        """Targets on the model's device, any shape and dtype; non-tensor targets pass as given."""
        dev = self.params[0].device
        if _is_tensor(y):
            return y.to(dev)
        try:
            return torch.as_tensor(y).to(dev)
        except (TypeError, ValueError, RuntimeError):
            return y

    def _check_output(self):
        out = self.env[self.output_node]
        batch = self.env[self.input_node].shape[0]
        if not _is_tensor(out) or out.dim() == 0 or out.shape[0] != batch:
            what = f"shape {tuple(out.shape)}" if _is_tensor(out) else type(out).__name__
            raise ConfigError(f"model {type(self.model).__name__}: output has {what} for a batch of {batch} "
                              f"(the engine needs one tensor with the batch as dimension 0)")

    @torch.no_grad()
    def prepare(self, x, y):
        """Unperturbed forward (batch statistics), caching every intermediate value; base loss."""
        dev, dtype = self.params[0].device, self.params[0].dtype
        x = model_input(x, self.params[0])  # token ids stay integers
        self.env = None  # a failure below leaves the engine unprepared, never half-prepared
        env = self._forward_cache(self._fmt(x))
        env = {n: self._fmt(v) for n, v in env.items()}
        self._set_feat_nodes(env)
        self._install(env, self._targets(y), None)
        return self.base

    def _install(self, env, y, base):
        """Make ``env`` the cache for minibatch targets ``y``; base loss computed unless given."""
        self.env = env
        try:
            self._check_output()
            self.y = y
            self._derive()
            if base is None:
                base = self.objective(self.env[self.output_node], y, 1)[0]
            self.base = torch.as_tensor(base).to(device=self.params[0].device,
                                                 dtype=self.params[0].dtype).reshape(())
        except BaseException:
            self.env = None
            raise

    def _fmt(self, t):
        """The engine's memory layout for a cached tensor (NHWC for 4-D when channels_last)."""
        if self.channels_last and _is_tensor(t) and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def _set_feat_nodes(self, env):
        self._feat_nodes = [n for n in self.nodes if n.op in ("placeholder", "call_module", "call_function",
                                                              "call_method") and _is_tensor(env[n])]

    # ---- features for MPI broadcast ---------------------------------------------------

    def feature_tensors(self) -> list:
        """Cached activations: every tensor-valued node (the input batch first), graph order.

        All are contiguous (ready for buffer-based MPI). The receiver passes them, with the
        minibatch targets and the base loss (shared by the caller), to :meth:`load_features`.
        """
        self._need_prepared()
        return [self.env[n].contiguous() for n in self._feat_nodes]

    @torch.no_grad()
    def feature_shapes(self, x_shape, x_dtype=None) -> list:
        """(shape, dtype) of each feature_tensors() entry for an input batch of shape ``x_shape``
        and dtype ``x_dtype`` (default: the model's; token ids: an integer dtype).

        Found with one forward pass on zeros (start-up cost), so receivers can allocate buffers.
        """
        dev, dtype = self.params[0].device, self.params[0].dtype
        if x_dtype is not None and not x_dtype.is_floating_point:
            dtype = x_dtype
        env = self._forward_cache(torch.zeros(tuple(x_shape), device=dev, dtype=dtype))
        if self._feat_nodes is None:
            self._set_feat_nodes(env)
        return [(tuple(env[n].shape), env[n].dtype) for n in self._feat_nodes]

    @torch.no_grad()
    def load_features(self, tensors, y, base) -> None:
        """Install broadcast features (another rank's feature_tensors()) instead of prepare.

        ``y``: the minibatch targets, ``base``: the base loss (the sender's prepare value).
        """
        tensors = list(tensors)
        if self._feat_nodes is None:
            self.feature_shapes(tuple(tensors[0].shape), tensors[0].dtype)
        if len(tensors) != len(self._feat_nodes):
            raise ValueError(f"expected {len(self._feat_nodes)} feature tensors, got {len(tensors)}")
        env = {}
        dev = self.params[0].device
        for n, t in zip(self._feat_nodes, tensors):
            env[n] = self._fmt(t.to(dev))
        for n in self.nodes:  # non-tensor values (shapes, tuples, parameters) are recomputed
            if n not in env and n.op not in ("output",):
                env[n] = self._call(n, map_arg(n.args, env.__getitem__), map_arg(n.kwargs, env.__getitem__))
        self._install(env, self._targets(y), base)

    def _need_prepared(self):
        if self.env is None:
            raise RuntimeError("QueryEngine: call prepare(x, y) or load_features(...) first")

    # ---- reps --------------------------------------------------------------------------

    def _block_index(self, rep: _Chan):
        if rep.idx_t is None:
            dev = self.params[0].device
            idx = torch.tensor(rep.idx, dtype=torch.long, device=dev)
            if rep.s > 1:
                idx = (idx[:, None] * rep.s + torch.arange(rep.s, device=dev)).reshape(-1)
            rep.idx_t = idx
        return rep.idx_t

    def _gather(self, base, rep: _Chan, Q):
        """Per-copy block of the cached ``base``: (Q*B, s, ...)."""
        return self._gather_view(base, rep, Q).reshape(Q * base.shape[0], rep.s, *base.shape[2:])

    def _gather_view(self, base, rep: _Chan, Q):
        """Per-copy block of the cached ``base`` as a (Q, B, s, ...) view (no reordering copy)."""
        g = base.index_select(1, self._block_index(rep))
        return g.view(base.shape[0], Q, rep.s, *base.shape[2:]).transpose(0, 1)

    def _chan_delta(self, base, rep: _Chan, Q):
        """rep.v - cached block, (Q*B, s, ...), in one pass."""
        v = rep.v.view(Q, base.shape[0], rep.s, *base.shape[2:])
        out = torch.empty_like(v, memory_format=torch.contiguous_format)
        torch.sub(v, self._gather_view(base, rep, Q), out=out)
        return out.view(rep.v.shape)

    def _materialize(self, n, rep, Q):
        """Full stacked tensor (Q*B, ...) of a _Chan or _Full rep."""
        if isinstance(rep, _Full):
            return rep.t
        base = self.env[n]
        B, s = base.shape[0], rep.s
        t = torch.empty((Q * B,) + tuple(base.shape[1:]), dtype=base.dtype, device=base.device,
                        memory_format=torch.channels_last if self.channels_last and base.dim() == 4
                        else torch.contiguous_format)
        tv = t.view(Q, *base.shape)
        tv.copy_(base.unsqueeze(0).expand_as(tv))
        v = rep.v.view(Q, B, s, *base.shape[2:])
        for q, i in enumerate(rep.idx):
            tv[q, :, i * s:(i + 1) * s] = v[q]
        return t

    def _copy_value(self, n, rep, q, Q):
        base = self.env[n]
        if rep is None:
            return base
        if isinstance(rep, _Per):
            return rep.vals[q]
        if isinstance(rep, _Full):
            return rep.t.view(Q, *base.shape)[q]
        s, i = rep.s, rep.idx[q]
        c = base.clone()
        c[:, i * s:(i + 1) * s] = rep.v.view(Q, base.shape[0], s, *base.shape[2:])[q]
        return c

    # ---- query evaluation ------------------------------------------------------------

    def _source(self, plan, n, flat, steps, Q):
        """Rep of the perturbed consumer node itself (incremental)."""
        out_base = self.env[n]
        mod = self.modules[n.target]
        dev = out_base.device
        if plan.kind in ("conv_w", "conv_b"):
            B, Cout, Ho, Wo = out_base.shape
            v = torch.empty(Q, B, Ho, Wo, dtype=out_base.dtype, device=dev)
            if plan.kind == "conv_b":
                idx = flat
                for q, o in enumerate(idx):
                    torch.add(out_base[:, o], steps[q], out=v[q])
                return _Chan(idx, 1, v.view(Q * B, 1, Ho, Wo), own=True)
            xpad = self._padded_input(n, mod)
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
                for q in range(Q):
                    ih, jw = i_l[q] * dh, j_l[q] * dw
                    sl = xpad[:, cin_l[q], ih:ih + sh * (Ho - 1) + 1:sh, jw:jw + sw * (Wo - 1) + 1:sw]
                    torch.add(out_base[:, o_l[q]], sl, alpha=steps[q], out=v[q])
                return _Chan(o_l, 1, v.view(Q * B, 1, Ho, Wo), own=True)
            sl = xpad[:, cin[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, Q, Ho, Wo)
            st = torch.tensor(steps, dtype=v.dtype, device=dev).view(1, Q, 1, 1)
            torch.addcmul(out_base[:, o], sl, st, out=v.permute(1, 0, 2, 3))
            return _Chan(o.tolist(), 1, v.view(Q * B, 1, Ho, Wo), own=True)
        if plan.kind in ("lin_w", "lin_b"):
            x = self.env[n.args[0]]
            if out_base.dim() != 2:
                return None
            B = out_base.shape[0]
            v = torch.empty(Q, B, dtype=out_base.dtype, device=dev)
            if plan.kind == "lin_w":
                f = torch.tensor(flat, device=dev)
                o, c = f // x.shape[1], f % x.shape[1]
                st = torch.tensor(steps, dtype=v.dtype, device=dev).view(1, Q)
                torch.addcmul(out_base[:, o], x[:, c], st, out=v.t())
                return _Chan(o.tolist(), 1, v.view(Q * B, 1), own=True)
            idx = []
            for q, f in enumerate(flat):
                if plan.kind == "lin_b":
                    o = f
                    torch.add(out_base[:, o], steps[q], out=v[q])
                else:
                    o, c = divmod(f, x.shape[1])
                    torch.add(out_base[:, o], x[:, c], alpha=steps[q], out=v[q])
                idx.append(o)
            return _Chan(idx, 1, v.view(Q * B, 1), own=True)
        if plan.kind in ("bn_w", "bn_b"):
            x = self.env[n.args[0]]
            mean, invstd = self._bn_stats[n]
            B = out_base.shape[0]
            v = torch.empty(Q, *out_base[:, 0].shape, dtype=out_base.dtype, device=dev)
            for q, o in enumerate(flat):
                if plan.kind == "bn_b":
                    torch.add(out_base[:, o], steps[q], out=v[q])
                else:
                    xhat = (x[:, o] - mean[0, 0, o]) * invstd[0, 0, o]
                    torch.add(out_base[:, o], xhat, alpha=steps[q], out=v[q])
            return _Chan(flat, 1, v.view(Q * B, 1, *out_base.shape[2:]), own=True)
        return None

    def _padded_input(self, n, mod):
        xp = self._xpad.get(n)
        if xp is None:
            x = self.env[n.args[0]]
            pad = mod.padding
            if pad == "valid":
                pad = (0, 0)
            elif pad == "same":
                tot = [d * (k - 1) for d, k in zip(mod.dilation, mod.kernel_size)]
                p = (tot[1] // 2, tot[1] - tot[1] // 2, tot[0] // 2, tot[0] - tot[0] // 2)
                xp = self._xpad[n] = F.pad(x, p)
                return xp
            xp = self._xpad[n] = F.pad(x, (pad[1], pad[1], pad[0], pad[0])) if any(pad) else x
        return xp

    def _perturbed_params(self, pi, flat, steps):
        p = self.params[pi]
        out = []
        for f, s in zip(flat, steps):
            t = p.detach().clone()
            t.view(-1)[f] += s
            out.append(t)
        return out

    def _generic(self, n, reps, Q, override=None):
        vals = []
        for q in range(Q):
            args = map_arg(n.args, lambda a: self._copy_value(a, reps.get(a), q, Q))
            kwargs = map_arg(n.kwargs, lambda a: self._copy_value(a, reps.get(a), q, Q))
            vals.append(self._call(n, args, kwargs, None if override is None else (override[0], override[1][q])))
        return _Per(vals)

    def _is_relu(self, n):
        if n.op == "call_module":
            return type(self.modules[n.target]) is nn.ReLU and not n.kwargs
        if n.op == "call_function":
            return n.target in (F.relu, torch.relu) and len(n.args) == 1 and not n.kwargs
        return n.op == "call_method" and n.target == "relu"

    def _step(self, n, reps, Q, last=()):
        """Rep of a downstream node from the reps of its inputs (``last``: inputs that die here)."""
        k = self.kind[n]
        if k in ("conv", "linear", "bn", "chanwise", "flatten"):
            a = n.args[0]
            r = reps.get(a)
            if isinstance(r, _Per) or r is None:
                return self._generic(n, reps, Q)
            fn = self.modules[n.target] if n.op == "call_module" else None
            if k == "conv":
                mod = fn
                if isinstance(r, _Chan) and mod.groups == 1 and mod.padding_mode == "zeros":
                    return self._chan_conv(n, mod, r, Q)
                t = self._materialize(a, r, Q)
                w = mod.weight
                self.flops += 2 * t.shape[0] * w.numel() * math.prod(self.env[n].shape[2:])
                return _Full(mod(t), own=True)
            if k == "linear":
                mod = fn
                base_in = self.env[a]
                if isinstance(r, _Chan) and base_in.dim() == 2:
                    return self._chan_linear(n, mod, r, Q)
                t = self._materialize(a, r, Q)
                self.flops += 2 * t.shape[0] * mod.weight.numel()
                return _Full(mod(t), own=True)
            if k == "bn":
                mod = fn
                if isinstance(r, _Chan):
                    idx = self._block_index(r)
                    w = None if mod.weight is None else mod.weight.index_select(0, idx).view(Q, r.s)
                    b = None if mod.bias is None else mod.bias.index_select(0, idx).view(Q, r.s)
                    return _Chan(r.idx, r.s, self._bn(r.v, mod.eps, w, b, Q)[0], r.idx_t, own=True)
                return _Full(self._bn(r.t, mod.eps, mod.weight, mod.bias, Q)[0], own=True)
            if k == "chanwise":
                if self._is_relu(n) and r.own and a in last:  # input dies here: rectify in place
                    if isinstance(r, _Chan):
                        return _Chan(r.idx, r.s, r.v.relu_(), r.idx_t, own=True)
                    return _Full(r.t.relu_(), own=True)

                def f(x):
                    return self._call(n, (x,) + tuple(n.args[1:]), n.kwargs)
                if isinstance(r, _Chan):
                    return _Chan(r.idx, r.s, f(r.v), r.idx_t, own=True)
                return _Full(f(r.t), own=True)
            if k == "flatten":
                if isinstance(r, _Chan):
                    inner = math.prod(self.env[a].shape[2:])
                    return _Chan(r.idx, r.s * inner, r.v.reshape(r.v.shape[0], -1))
                return _Full(r.t.flatten(1))
        if k == "binary":
            return self._binary(n, reps, Q, last)
        if k == "getitem":
            return self._getitem(n, reps, Q)
        if k == "pad":
            return self._pad(n, reps, Q)
        return self._generic(n, reps, Q)

    def _chan_conv(self, n, mod, r, Q):
        """cached_out + conv(delta, W[:, block]) for a delta confined to one channel block per copy.

        im2col of the small delta (s channels) times the (s*kh*kw, Cout) weight slice, added to
        the cached output by one batched matmul whose result is already NHWC.
        """
        a = n.args[0]
        x_base, out_base = self.env[a], self.env[n]
        B, s = x_base.shape[0], r.s
        delta = self._chan_delta(x_base, r, Q)  # (Q*B, s, H, W)
        w = mod.weight
        Cout, kh, kw = w.shape[0], w.shape[2], w.shape[3]
        Ho, Wo = out_base.shape[2], out_base.shape[3]
        pad = mod.padding
        if isinstance(pad, str):
            return _Full(mod(self._materialize(a, r, Q)))
        # im2col in NHWC order, (Q*B, Ho, Wo, s, kh, kw), from kh*kw strided views of the
        # padded delta (F.unfold loops over the Q*B samples and is several times slower)
        ph, pw = _pair(pad)
        sh, sw = _pair(mod.stride)
        dh, dw = _pair(mod.dilation)
        dp = F.pad(delta, (pw, pw, ph, ph)) if ph or pw else delta
        cols = torch.empty(Q * B, Ho, Wo, s, kh, kw, dtype=delta.dtype, device=delta.device)
        for i in range(kh):
            for j in range(kw):
                sl = dp[:, :, i * dh:i * dh + sh * (Ho - 1) + 1:sh, j * dw:j * dw + sw * (Wo - 1) + 1:sw]
                cols[..., i, j].copy_(sl.permute(0, 2, 3, 1))
        K = s * kh * kw
        cols = cols.view(Q, B * Ho * Wo, K)
        wg = w.index_select(1, self._block_index(r)).view(Cout, Q, K).permute(1, 2, 0)  # (Q, K, Cout)
        base_m = out_base.permute(0, 2, 3, 1).reshape(1, B * Ho * Wo, Cout)
        out = torch.baddbmm(base_m, cols, wg)  # (Q, B*Ho*Wo, Cout): NHWC per copy
        self.flops += 2 * Q * B * Ho * Wo * K * Cout
        out = out.view(Q * B, Ho, Wo, Cout).permute(0, 3, 1, 2)
        if not self.channels_last:
            out = out.contiguous()
        return _Full(out, own=True)

    def _chan_linear(self, n, mod, r, Q):
        a = n.args[0]
        x_base, out_base = self.env[a], self.env[n]
        B, s = x_base.shape[0], r.s
        delta = self._chan_delta(x_base, r, Q).view(Q, B, s)
        w = mod.weight.index_select(1, self._block_index(r))  # (Out, Q*s)
        w = w.view(w.shape[0], Q, s).permute(1, 2, 0)  # (Q, s, Out)
        self.flops += 2 * Q * B * s * w.shape[2]
        out = torch.baddbmm(out_base.unsqueeze(0), delta, w)
        return _Full(out.reshape(Q * B, -1), own=True)

    def _binary(self, n, reps, Q, last=()):
        op = _BINARY[n.target] if n.op == "call_function" else _BINARY_METHODS[n.target]
        args = n.args
        rs = [reps.get(a) if isinstance(a, fx.Node) else None for a in args]
        if any(isinstance(r, _Per) for r in rs):
            return self._generic(n, reps, Q)
        out_base = self.env[n]
        nodes = [a for a in args if isinstance(a, fx.Node)]
        if any(not _is_tensor(self.env[a]) for a in nodes):
            return self._generic(n, reps, Q)
        chans = [r for r in rs if isinstance(r, _Chan)]
        fulls = [r for r in rs if isinstance(r, _Full)]
        if chans and not fulls:
            c0 = chans[0]
            same = all(r.idx == c0.idx and r.s == c0.s for r in chans)
            shapes_ok = all(self.env[a].shape == out_base.shape for a in nodes)
            if same and shapes_ok:
                vals = []
                for a, r in zip(args, rs):
                    if not isinstance(a, fx.Node):
                        vals.append(a)
                    elif r is None:
                        vals.append(self._gather(self.env[a], c0, Q))
                    else:
                        vals.append(r.v)
                return _Chan(c0.idx, c0.s, self._binop(op, vals, args, rs, last, lambda r: r.v), c0.idx_t, own=True)
        if any(r is not None and self.env[a].dim() != out_base.dim() for a, r in zip(args, rs)):
            return self._generic(n, reps, Q)
        vals = []
        for a, r in zip(args, rs):
            if not isinstance(a, fx.Node):
                vals.append(a)
            elif r is None:
                vals.append(self.env[a])
            else:
                vals.append(self._materialize(a, r, Q).view(Q, *self.env[a].shape))
        res = self._binop(op, vals, args, rs, last, lambda r: r.t, (Q,) + tuple(out_base.shape))
        return _Full(res.reshape(Q * out_base.shape[0], *out_base.shape[1:]), own=True)

    @staticmethod
    def _binop(op, vals, args, rs, last, tensor_of, out_shape=None):
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
                if tuple(v.shape) != tuple(shape) or not _is_tensor(v) or (
                        _is_tensor(other) and torch.broadcast_shapes(v.shape, other.shape) != v.shape):
                    continue
                if _is_tensor(other) and other.dtype != v.dtype:
                    continue
                return op(v, other, out=v)
        return op(*vals)

    def _getitem(self, n, reps, Q):
        a, index = n.args[0], n.args[1] if len(n.args) > 1 else None
        r = reps.get(a) if isinstance(a, fx.Node) else None
        if (isinstance(r, (_Chan, _Full)) and not n.kwargs and isinstance(index, tuple) and len(index) >= 2
                and all(isinstance(i, slice) and all(not isinstance(v, fx.Node) for v in (i.start, i.stop, i.step))
                        for i in index) and index[0] == slice(None)):
            if isinstance(r, _Full):
                return _Full(r.t[index])
            if index[1] == slice(None):
                return _Chan(r.idx, r.s, r.v[index], r.idx_t)
            return _Full(self._materialize(a, r, Q)[index])
        return self._generic(n, reps, Q)

    def _pad(self, n, reps, Q):
        a = n.args[0]
        r = reps.get(a) if isinstance(a, fx.Node) else None
        pad = n.args[1] if len(n.args) > 1 else n.kwargs.get("pad")
        mode = n.args[2] if len(n.args) > 2 else n.kwargs.get("mode", "constant")
        if not isinstance(r, (_Chan, _Full)) or isinstance(pad, fx.Node) or any(isinstance(p, fx.Node) for p in pad):
            return self._generic(n, reps, Q)
        rest_args = n.args[2:]
        nd = self.env[a].dim()
        if len(pad) // 2 <= nd - 1 and isinstance(r, _Full):
            return _Full(F.pad(r.t, pad, *rest_args, **n.kwargs))
        if isinstance(r, _Chan) and min(pad) >= 0:
            if len(pad) // 2 <= nd - 2:
                return _Chan(r.idx, r.s, F.pad(r.v, pad, *rest_args, **n.kwargs), r.idx_t)
            if len(pad) // 2 == nd - 1 and mode == "constant" and pad[-2] % r.s == 0:
                inner = tuple(pad[:-2])
                v = F.pad(r.v, inner, *rest_args, **n.kwargs) if inner and any(inner) else r.v
                sh = pad[-2] // r.s
                return _Chan([i + sh for i in r.idx], r.s, v)
        if len(pad) // 2 <= nd - 1:
            return _Full(F.pad(self._materialize(a, r, Q), pad, *rest_args, **n.kwargs))
        return self._generic(n, reps, Q)

    @staticmethod
    def _settle_ownership(n, rep, reps, last):
        """In-place updates are allowed only on a tensor that no other live rep shares.

        If the output shares memory with an input rep (a view, nn.Identity, an in-place op),
        it inherits that input's ownership when the input dies here; otherwise both lose it.
        """
        t = rep.v if isinstance(rep, _Chan) else rep.t
        ptr = t.untyped_storage().data_ptr()
        for a in n.all_input_nodes:
            r = reps.get(a)
            if isinstance(r, (_Chan, _Full)):
                u = r.v if isinstance(r, _Chan) else r.t
                if u.untyped_storage().data_ptr() == ptr:
                    rep.own = rep.own and r.own and a in last
                    if a not in last:
                        r.own = False

    @torch.no_grad()
    def query(self, param_index: int, flat, steps) -> torch.Tensor:
        """Losses f(theta + steps[q] * e_{flat[q]}) of one parameter, all in one batched pass."""
        self._need_prepared()
        flat = [int(f) for f in flat]
        steps = [float(s) for s in steps]
        Q = len(flat)
        plan = self.plans[param_index]
        if Q == 0:
            return self.base.new_zeros(0)
        if not plan.reaches_loss:
            return self.base.expand(Q).clone()
        reps = {}
        override = None
        big = 0
        for n in plan.order:
            if n in plan.sources:
                rep = None
                if plan.kind != "generic" and all(a not in reps for a in n.all_input_nodes):
                    rep = self._source(plan, n, flat, steps, Q)
                if rep is None:
                    if override is None:
                        override = (plan.rel_name, self._perturbed_params(param_index, flat, steps))
                    rep = self._generic(n, reps, Q, override)
            else:
                last = plan.free_after.get(n, ())
                rep = self._step(n, reps, Q, last)
                if isinstance(rep, (_Chan, _Full)):
                    self._settle_ownership(n, rep, reps, last)
            reps[n] = rep
            if isinstance(rep, (_Chan, _Full)):
                big = max(big, (rep.v if isinstance(rep, _Chan) else rep.t).numel())
            for a in plan.free_after.get(n, ()):
                reps.pop(a, None)
        self.last_elems = -(-big // Q)
        r = reps[self.output_node]
        out = torch.cat(r.vals) if isinstance(r, _Per) else self._materialize(self.output_node, r, Q)
        return self.objective(out, self.y, Q, self.check)

    def _check_coords(self, coords):
        if list(coords.param_names) != self.param_names:
            raise ValueError("coordinates were built for a different model")

    def _groups(self, coords, start, stop, per_pass):
        """The stacked passes of positions [start, stop): (param index, flat indices) groups.

        Group sizes are fixed per parameter (see batch_size), so a shard starting on a
        multiple of query_batch within a parameter is cut into the same groups everywhere.
        """
        for pi, flat in coords.runs(start, stop):
            flat = flat.tolist()
            size = per_pass(pi)
            for i in range(0, len(flat), size):
                yield pi, flat[i:i + size]

    @torch.no_grad()
    def losses(self, coords, start: int = 0, stop: int | None = None, mu: float = 5e-3, sign: int = 1):
        """f(theta + sign*mu*e_k) for global coordinate positions k in [start, stop)."""
        self._check_coords(coords)
        self._need_prepared()
        stop = coords.total if stop is None else stop
        out = self.base.new_empty(stop - start)
        pos = 0
        for pi, chunk in self._groups(coords, start, stop, self.batch_size):
            self.check()
            out[pos:pos + len(chunk)] = self.query(pi, chunk, [sign * mu] * len(chunk))
            pos += len(chunk)
        return out

    def batch_size(self, param_index: int) -> int:
        """Copies per batched pass for this parameter: query_batch, capped by max_elements."""
        e = self.plans[param_index].elems
        if e is None:
            return 1  # not prepared yet
        cap = max(1, min(self.query_batch, self.max_elements // max(1, e)))
        # a divisor of query_batch: groups then tile the shards, whose bounds fall on
        # multiples of query_batch within a parameter (zohpc.sharding.balanced_bounds)
        return largest_divisor(self.query_batch, cap)

    @torch.no_grad()
    def central_losses(self, coords, start, stop, mu):
        """(f(theta + mu e_k), f(theta - mu e_k)) with both signs stacked in the same passes."""
        self._check_coords(coords)
        self._need_prepared()
        plus = self.base.new_empty(stop - start)
        minus = self.base.new_empty(stop - start)
        pos = 0
        for pi, chunk in self._groups(coords, start, stop, lambda pi: max(1, self.batch_size(pi) // 2)):
            self.check()
            k = len(chunk)
            v = self.query(pi, chunk + chunk, [mu] * k + [-mu] * k)
            plus[pos:pos + k], minus[pos:pos + k] = v[:k], v[k:]
            pos += k
        return plus, minus
