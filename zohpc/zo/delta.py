"""Delta precision modes: a query carries differences from the cached unperturbed pass.

``zo.precision = "delta-tf32" | "delta-bf16"``. The rules (zohpc.zo.rules) decide each node's
representation and kernel path as in IEEE mode; the reps (zohpc.zo.reps) then hold the
difference Δ = value(θ + μe) - value(θ) (float32), and :data:`DELTA_PATHS` gives each path's
difference form:

* low precision (zohpc.zo.lowp, TF32 or bf16 operands, float32 accumulation): convolutions
  and linear layers, ``Δ_out = W Δ_in`` (their bias cancels); these carry the FLOPs, and
  run on the executor's own paths, which take the mode's products when ``g.delta`` is set;
* exact in float32 (linear or bilinear, no cancellation): reshapes, slices, padding (with
  zeros), identity and average pooling, add/sub, ``Δ(ab) = Δa b + a Δb + Δa Δb``,
  ``Δ(a/b) = (Δa b - a Δb) / (b (b + Δb))``, ReLU as ``max(Δ, -h)`` where ``h > 0``,
  BatchNorm with batch statistics (zohpc.zo.lowp.bn_delta: the statistics' moves, then the
  output's, each a product with Δ);
* float64 differences ``σ(h + Δ) - σ(h)`` from the cached float32 values: other activations
  and max pooling, and every op the engine runs "rowwise" or copy by copy (LayerNorm, softmax, attention, encoder layers, matmuls of two activations,
  anything unknown), with the module's parameters in float64; the perturbed layer itself
  when it has no incremental rule (its parameter moved in float64);
* the model's output: cached output + Δ in float64, through the objective in float64, so
  ``f(θ + μe) - f(θ)`` is a float64 difference (the engine's base loss is float64).

A node none of whose inputs changed is left out (unchanged). An op whose value is not a float
tensor and differs between copies (an index, a count) has no difference:
:class:`DeltaUnsupported`, and the engine answers that parameter's queries in IEEE float32
(``QueryEngine.precision_fallbacks`` names the parameter and the op).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.node import map_arg

from . import kernels as K
from .executor import PATHS, block_index, copy_value, materialize, _binary_op, _is_relu
from .lowp import LowPrecision, binary_delta, bn_delta, diff64, relu_delta, sub64
from .ops import BN_TYPES, batch_args
from .reps import Chan, Full, Per

PRECISIONS = ("ieee", "delta-tf32", "delta-bf16")

_LINEAR_CHANWISE_MODULES = (nn.Identity, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                            nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
_LINEAR_CHANWISE_FUNCTIONS = {F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
                              F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}


class DeltaUnsupported(Exception):
    """A node's value has no difference (not a float tensor and not the same in every copy)."""


class DeltaMode:
    """The engine's state for a delta mode: its products and the float64 parameters of modules.

    ``native``: hardware low-precision kernels (see zohpc.zo.lowp); else operands are rounded
    and multiplied in float32 (emulation: the error of the mode, at float32 speed).
    """

    def __init__(self, precision: str, native: bool, device_type: str):
        self.precision = precision
        self.lowp = LowPrecision(precision.split("-", 1)[1], native, device_type)
        self._p64: dict = {}

    def reset(self) -> None:
        """Forget float64 parameters (they change every step); called per minibatch."""
        self._p64 = {}

    def params64(self, name: str, mod: nn.Module) -> dict:
        p = self._p64.get(name)
        if p is None:
            p = self._p64[name] = {k: to64(v) for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
        return p

    def source(self, g, n, how, reps, Q, override):
        """The perturbed consumer without an incremental rule: float64 difference per copy."""
        rep = _generic(g, n, how, reps, Q, (), override)
        if how == "source_generic":
            return rep
        first = rep.vals[0]
        if isinstance(first, tuple):
            return Full(tuple(torch.cat([v[i] for v in rep.vals]) if isinstance(t, torch.Tensor) else t
                              for i, t in enumerate(first)))
        return Full(torch.cat(rep.vals), own=True)


def to64(v):
    return v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v


def call64(g, n, args, kwargs, override=None):
    """Node ``n`` on float64 values, its module's parameters in float64 (``override``: one replaced)."""
    if n.op == "call_module":
        mod = g.modules[n.target]
        params = g.delta.params64(n.target, mod)
        if override is not None:
            params = dict(params, **{override[0]: override[1]})
        if g.kind[n] == "bn" or isinstance(mod, BN_TYPES):
            return K.batch_norm(args[0], mod.eps, params.get("weight"), params.get("bias"), 1)[0]
        return torch.func.functional_call(mod, params, args, kwargs)
    return to64(g.call(n, args, kwargs, override))


def _is_float(v) -> bool:
    if isinstance(v, (tuple, list)):
        return bool(v) and all(t is None or _is_float(t) for t in v) and any(t is not None for t in v)
    return isinstance(v, torch.Tensor) and v.is_floating_point()


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False


def _base(g, a, rep, Q):
    """Cached values shaped like a rep's difference: (Q, B, s, ...) blocks of a Chan, (1, B, ...) of a Full."""
    base = g.env[a]
    if isinstance(rep, Chan):
        return K.gather_view(base, block_index(g, rep), rep.s, Q)
    return base.unsqueeze(0)


def _dview(rep, Q):
    """A Chan or Full rep's difference as (Q, B, ...)."""
    t = rep.v if isinstance(rep, Chan) else rep.t
    return t.view(Q, t.shape[0] // Q, *t.shape[1:])


def _like(rep, t):
    """A rep of the same kind (and blocks) as ``rep`` holding ``t``, (Q, B, ...) or (Q*B, ...)."""
    if t.dim() == (rep.v if isinstance(rep, Chan) else rep.t).dim() + 1:
        t = t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])
    if isinstance(rep, Chan):
        return Chan(rep.idx, rep.s, t, rep.idx_t, own=True)
    return Full(t, own=True)


# ---- the paths ---------------------------------------------------------------------------------

def _bn(g, n, how, reps, Q, last):
    a = n.args[0]
    r, mod = reps[a], g.modules[n.target]
    w = mod.weight
    if isinstance(r, Chan) and w is not None:
        w = w.index_select(0, block_index(g, r)).view(Q, r.s)
    return _like(r, bn_delta(_base(g, a, r, Q), _dview(r, Q), mod.eps, w))


def _linear_chanwise(g, n) -> bool:
    if n.op == "call_module":
        return type(g.modules[n.target]) in _LINEAR_CHANWISE_MODULES
    return n.op == "call_function" and n.target in _LINEAR_CHANWISE_FUNCTIONS


def _chanwise(g, n, how, reps, Q, last):
    a = n.args[0]
    r = reps[a]

    def f(x):
        return g.call(n, (x,) + tuple(n.args[1:]), n.kwargs)
    if _linear_chanwise(g, n):
        return _like(r, f(r.v if isinstance(r, Chan) else r.t))
    if _is_relu(g, n):
        return _like(r, relu_delta(_base(g, a, r, Q), _dview(r, Q)))
    return _like(r, diff64(f, _base(g, a, r, Q), _dview(r, Q), Q))


def _binary_chan(g, n, how, reps, Q, last):
    rs = [reps.get(a) if isinstance(a, fx.Node) else None for a in n.args]
    c0 = next(r for r in rs if isinstance(r, Chan))
    idx = block_index(g, c0)
    bases, deltas = [], []
    for a, r in zip(n.args, rs):
        if not isinstance(a, fx.Node):
            bases.append(a)
            deltas.append(None)
        else:
            bases.append(K.gather_view(g.env[a], idx, c0.s, Q))
            deltas.append(None if r is None else _dview(r, Q))
    return _like(c0, binary_delta(_binary_op(n), bases, deltas))


def _binary_full(g, n, how, reps, Q, last):
    """Δ of a binary op on stacked operands; a per-copy operand (``binary_param``: a perturbed
    parameter read by get_attr) enters as its Δ stacked (Q, 1.., *shape)."""
    out_base = g.env[n]
    bases, deltas = [], []
    for a in n.args:
        r = reps.get(a) if isinstance(a, fx.Node) else None
        bases.append(g.env[a] if isinstance(a, fx.Node) else a)
        if isinstance(r, Per):
            deltas.append(K.parameter_copies(r.vals, Q, out_base.dim()))
        else:
            deltas.append(None if r is None else materialize(g, a, r, Q).view(Q, *g.env[a].shape))
    d = binary_delta(_binary_op(n), bases, deltas).expand(Q, *out_base.shape)
    return Full(d.reshape(Q * out_base.shape[0], *out_base.shape[1:]), own=True)


def _rowwise(g, n, how, reps, Q, last):
    """Perturbed and unperturbed stacked copies in float64, the difference in float32."""
    carry = batch_args(n, g.modules)

    def perturbed(key, a):
        if not isinstance(a, fx.Node):
            return a
        base, r = to64(g.env[a]), reps.get(a)
        if r is not None:
            d = materialize(g, a, r, Q).double().view(Q, *base.shape)
            return (base.unsqueeze(0) + d).reshape(Q * base.shape[0], *base.shape[1:])
        return K.repeat_copies(base, Q) if key in carry else base

    def unperturbed(key, a):
        return to64(g.env[a]) if isinstance(a, fx.Node) else a

    fp = call64(g, n, tuple(perturbed(i, a) for i, a in enumerate(n.args)),
                {k: perturbed(k, a) for k, a in n.kwargs.items()})
    fb = call64(g, n, tuple(unperturbed(i, a) for i, a in enumerate(n.args)),
                {k: unperturbed(k, a) for k, a in n.kwargs.items()})
    if not _is_float(fp):
        raise DeltaUnsupported(n)
    return Full(sub64(fp, fb, Q), own=True)


def _generic(g, n, how, reps, Q, last, override=None):
    """Copy by copy in float64: value(base + Δ) - value(base); an unchanged non-float value passes."""
    fb = call64(g, n, map_arg(n.args, lambda a: to64(g.env[a])), map_arg(n.kwargs, lambda a: to64(g.env[a])))

    def value(a, q):
        base, r = g.env[a], reps.get(a)
        if r is None:
            return to64(base)
        d = copy_value(g, a, r, q, Q)
        if isinstance(base, tuple):  # (attention output, weights): element by element
            return tuple(to64(b) + t.double() if _is_float(b) and isinstance(t, torch.Tensor) else to64(b)
                         for b, t in zip(base, d))
        return to64(base) + d.double() if _is_float(base) else to64(base)

    vals = []
    for q in range(Q):
        fp = call64(g, n, map_arg(n.args, lambda a: value(a, q)), map_arg(n.kwargs, lambda a: value(a, q)),
                    None if override is None else (override[0], override[1][q]))
        if _is_float(fb):
            vals.append(sub64(fp, fb, 1))
        elif _same(fp, fb):
            vals.append(None)
        else:
            raise DeltaUnsupported(n)
    if all(v is None for v in vals):
        return None  # unchanged in every copy (a shape, a count)
    if any(v is None for v in vals):
        raise DeltaUnsupported(n)
    return Per(vals)


def _generic_stacked(g, n, how, reps, Q, last):
    """Copy by copy in float64 (:func:`_generic`), the differences stacked along dim 0."""
    rep = _generic(g, n, how, reps, Q, last)
    return None if rep is None else Full(torch.cat(rep.vals), own=True)


DELTA_PATHS = {"bn_chan": _bn, "bn_full": _bn, "chanwise": _chanwise, "binary_chan": _binary_chan,
               "binary_full": _binary_full, "binary_param": _binary_full, "rowwise": _rowwise, "generic": _generic,
               "generic_stacked": _generic_stacked}
for _how in ("conv_chan", "conv_full", "linear_chan", "linear_full", "flatten_chan", "flatten_full", "getitem_full",
             "getitem_chan", "getitem_mat", "getitem_tuple", "pad_full", "pad_chan", "pad_shift", "pad_mat"):
    DELTA_PATHS[_how] = PATHS[_how]  # linear ops: the executor's own paths move differences (zohpc.zo.executor)

assert set(DELTA_PATHS) == set(PATHS), "every kernel path needs its difference form"


def output_values(g, rep, Q):
    """The model's output of every copy in float64: cached output + Δ, stacked (Q*B, ...)."""
    base = g.env[g.output_node].double()
    out = K.repeat_copies(base, Q)
    if rep is None:
        return out
    d = torch.cat(rep.vals) if isinstance(rep, Per) else materialize(g, g.output_node, rep, Q)
    return out + d.double().reshape(out.shape)


__all__ = ["DELTA_PATHS", "PRECISIONS", "DeltaMode", "DeltaUnsupported", "call64", "output_values", "to64"]
