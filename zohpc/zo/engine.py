"""The ZO query engine: loss values f(theta + step * e_k) for many coordinates k, fast.

How (DESIGN.md, "feature reuse" and "incremental first layer", done per layer for any model):

* The model is traced once with torch.fx (zohpc.zo.tracing: PyTorch's transformer encoder
  layers opened up into their ops) into a graph of ops, each classified into an
  operation kind (zohpc.zo.ops). ``prepare`` runs one unperturbed forward and caches every
  intermediate value.
* A query perturbs one scalar of one parameter P. Only the nodes downstream of P's consumer
  are re-run (its plan, zohpc.zo.plans); every other input is read from the cache.
* Perturbed values travel in one of three representations (zohpc.zo.reps): one perturbed
  channel block per copy, all copies stacked along dim 0, or one value per copy. One rule
  per operation kind (zohpc.zo.rules) decides each node's representation from its inputs'
  and the shapes; the work model (zohpc.zo.work) calls those rules once per input shape and
  records the decisions, which the executor (zohpc.zo.executor) runs with pure tensor
  kernels (zohpc.zo.kernels). What is planned and costed is what runs.
* The perturbed layer itself is incremental (conv, linear, BatchNorm, embedding rules).
* The model's output, stacked (Q*B, ...), goes through the task's objective
  (:class:`~zohpc.zo.objective.Objective`: Q loss values; a black box is called per copy).
* ``precision``: "ieee" runs queries in the model's dtype; "delta-tf32" and "delta-bf16"
  propagate differences from the cached pass, low precision in convolutions and linear
  layers, and form the loss difference in float64 (zohpc.zo.delta; the base loss is then float64).

The parameters are never modified; queries are functional. BatchNorm always uses batch
statistics of each copy (training-mode semantics) and never touches running statistics.
Nothing process-wide is changed (the allocator setting is zohpc.runtime.tune_malloc).
Coordinate grouping, ``losses`` and ``central_losses`` are the shared zohpc.zo.base.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import ConfigError
from ..inputs import model_input
from ..sharding import largest_divisor
from .base import EngineBase
from .determinism import NondeterministicModelError, check_deterministic, check_graph_deterministic  # noqa: F401
from .executor import PATHS, materialize, run_source, settle_ownership
from .delta import DELTA_PATHS, PRECISIONS, DeltaMode, DeltaUnsupported, output_values
from .features import FeatureCache
from .interpreter import NodeInterpreter
from .kernels import batch_norm, padded_conv_input, perturbed_params
from .objective import Objective
from .ops import classify
from .plans import Plan, make_plan
from .tracing import trace
from .reps import Chan, Full, Per
from .work import plan_work


def _first_line(exc: BaseException, limit: int = 160) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


class QueryEngine(NodeInterpreter, FeatureCache, EngineBase):
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
    ``precision``: "ieee" (default), "delta-tf32" or "delta-bf16" (zohpc.zo.delta);
    ``native_lowp``: a delta mode's products on the hardware's low-precision kernels (default:
    on CUDA) instead of emulated (operands rounded, float32 products: the error, on any CPU).
    A parameter whose queries meet an op without a difference form is answered in IEEE
    float32 and named in ``precision_fallbacks`` (parameter -> op).

    Raises ConfigError with a one-line reason when the model cannot be planned (torch.fx
    cannot trace it, or its forward is not ``forward(x) -> one tensor``); callers then fall
    back to full forward passes.
    """

    shares_features = True

    def __init__(self, model: nn.Module, objective: Objective | None = None, *, query_batch: int = 32,
                 max_elements: int | None = None, channels_last: bool = True, precision: str = "ieee",
                 native_lowp: bool | None = None):
        check_deterministic(model)
        if int(query_batch) < 1:
            raise ConfigError(f"config key 'zo.query_batch': must be >= 1, got {query_batch}")
        if precision not in PRECISIONS:
            raise ConfigError(f"config key 'zo.precision': {precision!r} is not one of {', '.join(PRECISIONS)}")
        if objective is not None and not isinstance(objective, Objective):
            raise TypeError(f"objective must be a zohpc.zo.Objective or None, got {type(objective).__name__}")
        self.model = model
        self.query_batch = int(query_batch)
        self.objective = objective if objective is not None else Objective()
        first = next(iter(model.parameters()), None)
        name = type(model).__name__
        if first is None:
            raise ConfigError(f"model {name} has no parameters")
        self.device, self.dtype = first.device, first.dtype
        self.precision = precision
        self._delta = None if precision == "ieee" else DeltaMode(
            precision, self.device.type == "cuda" if native_lowp is None else native_lowp, self.device.type)
        if self._delta is not None and self.dtype != torch.float32:
            raise ConfigError(f"config key 'zo.precision': {precision!r} needs a float32 model, got {self.dtype}")
        self.loss_dtype = self.dtype if self._delta is None else torch.float64
        self.delta = None  # the DeltaMode while a delta query runs (the executor's paths read it)
        self.precision_fallbacks: dict = {}
        self.max_elements = int(max_elements) if max_elements else (2 ** 27 if self.device.type != "cpu" else 2 ** 22)
        self.channels_last = bool(channels_last)
        try:
            gm = trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is a model the engine cannot plan
            raise ConfigError(f"torch.fx cannot trace model {name}: {_first_line(exc)}") from None
        self.graph = gm.graph
        check_graph_deterministic(self.graph)
        self.nodes = list(self.graph.nodes)
        pos = {n: i for i, n in enumerate(self.nodes)}
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise ConfigError(f"model {name}: forward takes {len(placeholders)} inputs (the engine "
                              f"needs forward(x) with one)")
        self.input_node = placeholders[0]
        self.output_node = next(n for n in self.nodes if n.op == "output").args[0]
        if not isinstance(self.output_node, fx.Node) or self.output_node.op == "placeholder":
            raise ConfigError(f"model {name}: forward returns {type(self.output_node).__name__} "
                              f"(the engine needs one tensor computed from the input)")
        self.modules = dict(model.named_modules())
        self.kind = {n: classify(n, self.modules) for n in self.nodes}
        named = list(model.named_parameters())
        self.param_names = [pname for pname, _ in named]
        self.params = [p for _, p in named]
        self.plans: list[Plan] = [make_plan(self.nodes, pos, self.kind, self.modules, self.output_node, pname)
                                  for pname in self.param_names]
        self.env: dict | None = None
        self.y = self.base = None
        self.batch = 0
        self.bn_stats: dict = {}
        self._xpad: dict = {}
        self._channel_major: dict = {}  # conv node -> NCHW copies of its output and padded input
        self._channel_reads: dict = {}  # conv node -> queries of this minibatch that read single channels
        self._present: dict = {}  # embedding node -> which table rows the minibatch's tokens use
        self._feat_nodes = None
        self._in_shape = None
        self.flops = 0  # matmul-type FLOPs executed by queries (conv/linear), see bench
        self.last_elems = 0  # largest stacked tensor per copy of the last query (tests the plan's work)
        self.trace: dict | None = None  # set to {} to record node -> concrete rep of queries (tests)

    # ---- the cache -----------------------------------------------------------------------

    def _derive(self):
        """Values derived from the cache (plans' work, BN statistics, token rows); prepare and load_features."""
        shape = tuple(self.env[self.input_node].shape)
        self.batch = shape[0]
        if shape != self._in_shape:  # decisions and tensor sizes per copy depend on the input shape only
            self._in_shape = shape
            for plan in self.plans:
                plan_work(self, plan)
        self.bn_stats, self._xpad, self._present = {}, {}, {}
        self._channel_major, self._channel_reads = {}, {}
        if self._delta is not None:
            self._delta.reset()
        for n in self.nodes:
            if self.kind[n] == "bn":
                self.bn_stats[n] = batch_norm(self.env[n.args[0]], self.modules[n.target].eps, None, None, 1,
                                              apply=False)[1:]
            elif self.kind[n] == "embedding" and n.op == "call_module":
                present = torch.zeros(self.modules[n.target].num_embeddings, dtype=torch.bool, device=self.device)
                present[self.env[n.args[0]].reshape(-1)] = True
                self._present[n] = present

    def targets(self, y):
        """Targets on the model's device, any shape and dtype; non-tensor targets pass as given."""
        if isinstance(y, torch.Tensor):
            return y.to(self.device)
        try:
            return torch.as_tensor(y).to(self.device)
        except (TypeError, ValueError, RuntimeError):
            return y

    def _check_output(self):
        out = self.env[self.output_node]
        batch = self.env[self.input_node].shape[0]
        if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != batch:
            what = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"model {type(self.model).__name__}: output has {what} for a batch of {batch} "
                              f"(the engine needs one tensor with the batch as dimension 0)")

    @torch.no_grad()
    def prepare(self, x, y):
        """Unperturbed forward (batch statistics), caching every intermediate value; base loss.

        Float inputs are cast to the model's dtype; integer inputs (token ids) keep theirs.
        """
        x = model_input(x, self.params[0])  # token ids stay integers
        self.env = None  # a failure below leaves the engine unprepared, never half-prepared
        env = self.forward_cache(self.fmt(x))
        env = {n: self.fmt(v) for n, v in env.items()}
        self.set_feature_nodes(env)
        self.install(env, self.targets(y), None)
        return self.base

    def install(self, env, y, base):
        """Make ``env`` the cache for minibatch targets ``y``; base loss computed unless given."""
        self.env = env
        try:
            self._check_output()
            self.y = y
            self._derive()
            if base is None:
                out = self.env[self.output_node]
                base = self.objective(out if self._delta is None else out.double(), y, 1)[0]
            self.base = torch.as_tensor(base).to(device=self.device, dtype=self.loss_dtype).reshape(())
        except BaseException:
            self.env = self.base = None
            raise

    def fmt(self, t):
        """The engine's memory layout for a cached tensor (NHWC for 4-D when channels_last)."""
        if self.channels_last and isinstance(t, torch.Tensor) and t.dim() == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t

    def need_prepared(self):
        if self.env is None:
            raise RuntimeError("QueryEngine: call prepare(x, y) or load_features(...) first")

    def padded_input(self, n, mod):
        xp = self._xpad.get(n)
        if xp is None:
            xp = self._xpad[n] = padded_conv_input(self.env[n.args[0]], mod)
        return xp

    def channel_planes(self, n, mod, queries: int):
        """(cached output, padded input) of conv ``n``, for reading one channel per query.

        In NHWC order one channel is a strided read that touches every cache line of the
        tensor. Once ``n`` has served 8 queries of this minibatch, channel-major (NCHW) copies
        are made and read instead: the same values, up to 17x faster per query at 32x32, for
        one copy that costs about what 8 strided reads do. A delta mode starts from zeros and
        never reads the output: it gets None for it, and no copy of it is made.
        """
        seen = self._channel_reads[n] = self._channel_reads.get(n, 0) + queries
        if seen < 8 or not self.channels_last:
            return (self.env[n] if self.delta is None else None), self.padded_input(n, mod)
        planes = self._channel_major.setdefault(n, [None, None])
        if planes[1] is None:
            planes[1] = self.padded_input(n, mod).contiguous()
        if planes[0] is None and self.delta is None:
            planes[0] = self.env[n].contiguous()
        return (planes[0] if self.delta is None else None), planes[1]

    def work(self) -> list[Plan]:
        """Every parameter's plan with its work on the current input shape (zohpc.zo.work.plan_work)."""
        self.need_prepared()
        return list(self.plans)

    # ---- queries ---------------------------------------------------------------------------

    def free_mask(self, param_index: int, flat: list):
        """Embedding rows whose token is absent from the minibatch: the loss cannot change."""
        plan = self.plans[param_index]
        if plan.kind != "emb_w":
            return None
        (n,) = plan.sources
        present = self._present.get(n)
        if present is None:
            return None
        D = self.params[param_index].shape[1]
        return (~present[torch.tensor(flat, dtype=torch.long, device=self.device) // D]).tolist()

    @torch.no_grad()
    def query(self, param_index: int, flat, steps) -> torch.Tensor:
        """Losses f(theta + steps[q] * e_{flat[q]}) of one parameter, all in one batched pass."""
        self.need_prepared()
        flat = [int(f) for f in flat]
        steps = [float(s) for s in steps]
        Q = len(flat)
        plan = self.plans[param_index]
        if Q == 0:
            return self.base.new_zeros(0)
        if not plan.reaches_loss:
            return self.base.expand(Q).clone()
        name = self.param_names[param_index]
        if self._delta is not None and name not in self.precision_fallbacks:
            self.delta = self._delta
            try:
                r = self._propagate(plan, param_index, flat, steps, Q, DELTA_PATHS, torch.float64)
                return self.objective(output_values(self, r, Q), self.y, Q, self.check)
            except DeltaUnsupported as exc:  # an op without a difference: this parameter in IEEE float32
                self.precision_fallbacks[name] = str(exc.args[0])
            finally:
                self.delta = None
        r = self._propagate(plan, param_index, flat, steps, Q, PATHS, None)
        out = torch.cat(r.vals) if isinstance(r, Per) else materialize(self, self.output_node, r, Q)
        return self.objective(out, self.y, Q, self.check).to(self.loss_dtype)

    def _propagate(self, plan, param_index, flat, steps, Q, paths, param_dtype):
        """The output node's rep of a query: each node of the plan in order on ``paths``.

        In a delta mode a node none of whose inputs changed is unchanged (no rep; the output's
        rep may then be None), and the generic path's parameters are moved in ``param_dtype``.
        """
        reps = {}
        override = []

        def perturbed():  # the generic path's parameters, made once per query
            if not override:
                p = self.params[param_index]
                override.append((plan.rel_name, perturbed_params(p if param_dtype is None else p.to(param_dtype),
                                                                 flat, steps)))
            return override[0]

        big = 0
        for n in plan.order:
            how = plan.how[n]
            last = plan.free_after.get(n, ())
            if n in plan.sources:
                rep = run_source(self, plan, n, how, flat, steps, Q, reps, perturbed)
            elif self.delta is not None and all(a not in reps for a in n.all_input_nodes):
                rep = None
            else:
                rep = paths[how](self, n, how, reps, Q, last)
                if isinstance(rep, (Chan, Full)):
                    settle_ownership(n, rep, reps, last)
            if rep is not None:
                reps[n] = rep
                if self.trace is not None:
                    self.trace[n] = rep
            if isinstance(rep, Chan):
                big = max(big, rep.v.numel())
            elif isinstance(rep, Full):
                big = max(big, max((t.numel() for t in rep.t if isinstance(t, torch.Tensor)), default=0)
                          if isinstance(rep.t, tuple) else rep.t.numel())
            for a in last:
                reps.pop(a, None)
        self.last_elems = -(-big // Q)
        return reps.get(self.output_node)

    def batch_size(self, param_index: int) -> int:
        """Copies per batched pass for this parameter: query_batch, capped by max_elements."""
        e = self.plans[param_index].elems
        if e is None:
            return 1  # not prepared yet
        cap = max(1, min(self.query_batch, self.max_elements // max(1, e)))
        # a divisor of query_batch: groups then tile the shards, whose bounds fall on
        # multiples of query_batch within a parameter (zohpc.sharding.balanced_bounds)
        return largest_divisor(self.query_batch, cap)


__all__ = ["QueryEngine"]
