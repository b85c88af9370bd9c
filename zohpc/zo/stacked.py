"""Full-forward loss queries, many perturbed copies of the model per batched pass.

:class:`StackedForward` evaluates ``f(theta + delta_k)`` for a block of perturbations of the
flat parameter vector (RGE, ZO-GraSP, and CGE of models torch.fx cannot trace). Copies are
stacked with ``torch.func.vmap`` over ``torch.func.functional_call``: one batched pass runs
up to ``copies_per_pass`` copies, each with its own parameters and its own BatchNorm batch
statistics. The model's parameters and running statistics are never modified (queries are
functional, under :func:`~zohpc.zo.batchnorm.batch_stats_only`).

Where vmap cannot run the model (data-dependent control flow on activations, ``.item()``,
an op without a batching rule) or gives other values than the plain model, every copy is
run by its own ``functional_call`` instead. That choice is made once, on the first
``prepare``, and is readable as ``.stacking`` (``"vmap"`` or ``"loop"``) with ``.reason``
for the caller's log line.

Copies per pass: ``query_batch`` capped so that the stacked activations stay within
``max_elements`` (the largest module output per copy is measured on the unperturbed pass);
the cap depends only on the model and the batch shape, so every rank stacks alike.

:class:`FullForwardEngine` is the CGE query engine for untraceable models, with the query
interface (zohpc.zo.base) as :class:`zohpc.zo.engine.QueryEngine` (no feature reuse: every query is a full
forward; no feature broadcast: ``feature_tensors()`` is None, ranks recompute).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ConfigError, describe
from ..inputs import model_input
from ..sharding import largest_divisor
from ..stop import no_check
from .base import EngineBase
from .batchnorm import batch_stats_only
from .objective import Objective


class StackedForward:
    """Losses ``f(center + delta_k)`` of stacked perturbed copies of ``model`` on one minibatch.

    ``objective``: a :class:`~zohpc.zo.objective.Objective` or any callable
    ``(outputs (Q*B, ...), targets, Q) -> (Q,)``; None: mean cross entropy.
    """

    def __init__(self, model: nn.Module, objective=None, query_batch: int = 32, max_elements: int | None = None):
        named = list(model.named_parameters())
        if not named:
            raise ConfigError(f"model {type(model).__name__} has no parameters")
        if int(query_batch) < 1:
            raise ConfigError(f"config key 'zo.query_batch': must be >= 1, got {query_batch}")
        self.model = model
        self.objective = Objective() if objective is None else objective
        self.query_batch = int(query_batch)
        self.names = [n for n, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.dim = sum(self.numels)
        first = named[0][1]
        self.dtype, self.device = first.dtype, first.device
        on_gpu = self.device.type != "cpu"
        self.max_elements = int(max_elements) if max_elements else (2 ** 27 if on_gpu else 2 ** 22)
        self.stacking: str | None = None  # "vmap" | "loop", decided on the first prepare
        self.reason = ""
        self.base = None
        self._x = self._y = None
        self._theta: list[torch.Tensor] | None = None
        self._theta64: torch.Tensor | None = None
        self._per_copy: dict = {}  # input shape -> largest module output (elements) of one copy
        self._nhwc: dict = {}  # input shape -> run passes on a channels-last input

    # ---- preparation --------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, x, y, center: torch.Tensor | None = None, base: bool = True):
        """Fix the minibatch and the point (the model's parameters, or the flat ``center``).

        Returns the base loss ``f(center)`` (0-dim), also kept as ``.base``. ``base=False``
        skips that forward pass (after the first one for a batch shape) and returns None: for
        a rank that only evaluates its queries, or a driver that has the base loss from its
        own training-mode forward (same batch statistics, same value). Call it again after
        the model's parameters change (the point is read here).
        """
        x = model_input(x, next(self.model.parameters()))
        self._y = y.to(self.device) if isinstance(y, torch.Tensor) else y
        if center is None:
            self._theta = [p.detach() for p in self.model.parameters()]
        else:
            center = torch.as_tensor(center).reshape(-1)
            if center.numel() != self.dim:
                raise ValueError(f"center has {center.numel()} entries, the model {self.dim} parameters")
            self._theta = list(center.to(device=self.device, dtype=self.dtype).split(self.numels))
            self._theta = [t.view(s) for t, s in zip(self._theta, self.shapes)]
        self._theta64 = None
        self._x = x
        key = tuple(x.shape)
        if key not in self._per_copy:
            out, self._per_copy[key] = self._measured_forward()
            if self.stacking is None:
                self._decide_stacking()
            out = self._choose_layout(key, out)
        else:
            if self._nhwc[key]:
                self._x = x.contiguous(memory_format=torch.channels_last)
            out = self._forward(self._theta) if base else None
        self.base = self.objective(out, self._y, 1).reshape(-1)[0] if base else None
        return self.base

    def _choose_layout(self, key, out):
        """Channels-last input for 4-D float batches on the CPU when copies run one per pass
        (oneDNN convolutions measured 1.3-1.5x faster; vmap passes gain nothing), unless the
        model cannot take it (e.g. it views its input). Fixed per batch shape."""
        x = self._x
        self._nhwc[key] = False
        if x.dim() == 4 and x.is_floating_point() and self.device.type == "cpu" and self.copies_per_pass == 1:
            self._x = x.contiguous(memory_format=torch.channels_last)
            try:
                out = self._forward(self._theta)
                self._nhwc[key] = True
            except Exception:  # noqa: BLE001 - keep the layout the model was written for
                self._x = x
        return out

    def _forward(self, params: list[torch.Tensor]) -> torch.Tensor:
        with batch_stats_only(self.model):
            return torch.func.functional_call(self.model, dict(zip(self.names, params)), (self._x,))

    def _measured_forward(self):
        """The unperturbed pass, noting the largest tensor any module outputs (per copy)."""
        largest = [int(self._x.numel())]

        def hook(_module, _inputs, output):
            for t in (output if isinstance(output, (tuple, list)) else (output,)):
                if isinstance(t, torch.Tensor):
                    largest[0] = max(largest[0], t.numel())

        handles = [m.register_forward_hook(hook) for m in self.model.modules()]
        try:
            out = self._forward(self._theta)
        finally:
            for h in handles:
                h.remove()
        return out, largest[0]

    def _decide_stacking(self) -> None:
        """vmap if it runs this model and agrees with per-copy passes (on two samples, two copies)."""
        if self.query_batch == 1:
            self.stacking, self.reason = "loop", "query_batch is 1"
            return
        x_full = self._x
        self._x = x_full[:2]
        try:
            params = {n: t.unsqueeze(0).expand(2, *t.shape) for n, t in zip(self.names, self._theta)}
            try:
                stacked = self._vmap_outputs(params)
            except Exception as exc:  # noqa: BLE001 - any failure means: run copies one by one
                self.stacking = "loop"
                self.reason = f"torch.func.vmap cannot run {type(self.model).__name__} ({describe(exc)})"
                return
            single = self._forward(self._theta)
            if not isinstance(stacked, torch.Tensor) or stacked.shape[1:] != single.shape or not torch.allclose(
                    stacked[1], single, rtol=1e-4, atol=1e-5 * (1 + float(single.abs().max()))):
                self.stacking = "loop"
                self.reason = f"torch.func.vmap gives other outputs than {type(self.model).__name__} itself"
                return
            self.stacking, self.reason = "vmap", "copies stacked with torch.func.vmap"
        finally:
            self._x = x_full

    def _vmap_outputs(self, batched: dict) -> torch.Tensor:
        fixed = {n: t for n, t in zip(self.names, self._theta) if n not in batched}

        def one(params):
            return torch.func.functional_call(self.model, {**fixed, **params}, (self._x,))

        with batch_stats_only(self.model):
            return torch.func.vmap(one, randomness="error")(batched)

    # ---- queries --------------------------------------------------------------------------

    @property
    def copies_per_pass(self) -> int:
        """Perturbed copies stacked into one pass (1 when copies run one by one)."""
        if self._x is None:
            raise RuntimeError("StackedForward: call prepare(x, y) first")
        if self.stacking != "vmap":
            return 1
        per_copy = self._per_copy[tuple(self._x.shape)]
        return max(1, min(self.query_batch, self.max_elements // max(1, per_copy)))

    @torch.no_grad()
    def _losses(self, batched: dict, k: int) -> torch.Tensor:
        """Losses of ``k`` copies whose parameters ``batched`` (name -> (k, *shape)) replace theta's."""
        if k > 1 and self.stacking == "vmap":
            out = self._vmap_outputs(batched)
            out = out.reshape(k * out.shape[1], *out.shape[2:])
        else:
            outs = []
            for i in range(k):
                params = [batched[n][i] if n in batched else t for n, t in zip(self.names, self._theta)]
                outs.append(self._forward(params))
            out = outs[0] if k == 1 else torch.cat(outs)
        return self.objective(out, self._y, k)

    @torch.no_grad()
    def losses_of(self, deltas: torch.Tensor, check=no_check) -> torch.Tensor:
        """``f(center + deltas[k])`` for the rows of ``deltas`` (K, D): a (K,) tensor (the objective's dtype).

        Rows are stacked ``copies_per_pass`` at a time, counted from row 0; ``check()`` runs
        before every pass. Each copy's parameters are ``center + delta`` rounded once from float64.
        """
        if self._x is None:
            raise RuntimeError("StackedForward: call prepare(x, y) first")
        if deltas.dim() != 2 or deltas.shape[1] != self.dim:
            raise ValueError(f"deltas must be (K, {self.dim}), got {tuple(deltas.shape)}")
        if self._theta64 is None:
            self._theta64 = torch.cat([t.reshape(-1) for t in self._theta]).double()
        K = deltas.shape[0]
        out = []
        size = self.copies_per_pass
        for a in range(0, K, size):
            check()
            b = min(K, a + size)
            rows = (self._theta64 + deltas[a:b].to(device=self.device, dtype=torch.float64)).to(self.dtype)
            batched = {n: t.view(b - a, *s) for n, t, s in zip(self.names, rows.split(self.numels, dim=1), self.shapes)}
            out.append(self._losses(batched, b - a))
        return torch.cat(out) if out else torch.zeros(0, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def coordinate_losses(self, param_index: int, flat, steps) -> torch.Tensor:
        """``f(theta + steps[k] e_{flat[k]})`` for entries of ONE parameter, in one pass.

        Only that parameter is stacked (``len(flat)`` copies of it); the perturbed entry is
        ``theta_i + step`` in the model's dtype.
        """
        k = len(flat)
        if k == 0:
            return torch.zeros(0, dtype=self.dtype, device=self.device)
        t = self._theta[param_index]
        copies = t.reshape(1, -1).repeat(k, 1)
        rows = torch.arange(k, device=t.device)
        cols = torch.as_tensor(list(flat), dtype=torch.long, device=t.device)
        copies[rows, cols] += torch.as_tensor(list(steps), dtype=t.dtype, device=t.device)
        return self._losses({self.names[param_index]: copies.view(k, *t.shape)}, k)


class FullForwardEngine(EngineBase):
    """CGE queries by full forward passes, for models torch.fx cannot trace.

    Implements :class:`zohpc.zo.base.QueryEngineProtocol` like
    :class:`zohpc.zo.engine.QueryEngine` (``losses``, ``central_losses`` and the grouping
    come from the shared :class:`~zohpc.zo.base.EngineBase`); ``feature_tensors`` is None:
    ranks recompute.
    """

    def __init__(self, model: nn.Module, objective=None, query_batch: int = 32, max_elements: int | None = None):
        self.forward = StackedForward(model, objective, query_batch, max_elements)
        self.query_batch = self.forward.query_batch
        self.param_names = list(self.forward.names)
        self.check = no_check
        self.base = None

    @property
    def stacking(self) -> str | None:
        return self.forward.stacking

    @property
    def reason(self) -> str:
        return self.forward.reason

    def prepare(self, x, y) -> torch.Tensor:
        """Unperturbed forward (batch statistics) at the model's parameters; the base loss."""
        self.base = self.forward.prepare(x, y)
        return self.base

    def feature_tensors(self):
        """None: there are no cached features to broadcast (every rank runs ``prepare``)."""
        return None

    def batch_size(self, param_index: int) -> int:
        """Copies per pass: the largest divisor of query_batch within the stacking cap."""
        return largest_divisor(self.query_batch, self.forward.copies_per_pass)

    def query(self, param_index: int, flat, steps) -> torch.Tensor:
        """Losses of one parameter's coordinates, each a full forward (stacked copies)."""
        return self.forward.coordinate_losses(param_index, flat, steps)
