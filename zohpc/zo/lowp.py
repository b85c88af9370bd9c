"""Low-precision products and exact difference kernels of the delta precision modes.

A delta mode (``zo.precision = "delta-tf32" | "delta-bf16"``, zohpc.zo.delta) propagates the
*difference* Δ of a query from the cached unperturbed pass. Through a linear layer
``Δ_out = W Δ_in`` is exactly linear, so rounding W and Δ to a short mantissa errs relative
to Δ (not to the activation, as a float32 difference of two nearly equal losses does). This
module holds those products (:class:`LowPrecision`) and the kernels that keep everything
else free of cancellation: ReLU's and BatchNorm's differences in float32 written so that no
two near-equal values are subtracted, any other op's difference in float64.

Emulation: TF32 keeps 10 mantissa bits and bf16 7; :func:`round_tf32` / :func:`round_bf16`
round float32 operands to nearest (even), and the product runs in float32, so each product
of two rounded operands is exact and sums accumulate in float32: what a tensor core does with
float32 accumulation. CPUs always emulate TF32; ``native`` bf16 casts operands to bfloat16 and
runs the framework's bf16 kernels (tensor cores on a GPU; the output is then also rounded to
bf16), and native TF32 on CUDA enables TF32 for the duration of the product only.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

MODES = ("tf32", "bf16")


def round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10 mantissa bits, to nearest even (a new float32 tensor)."""
    i = t.view(torch.int32)
    r = (i + (0xFFF + ((i >> 13) & 1))) & -0x2000
    return r.view(torch.float32)


def round_bf16(t: torch.Tensor) -> torch.Tensor:
    """float32 rounded to bfloat16's 7 mantissa bits, to nearest even (a new float32 tensor)."""
    return t.to(torch.bfloat16).to(torch.float32)


@contextlib.contextmanager
def _cuda_tf32():
    """TF32 on for CUDA matmuls and cuDNN convolutions inside the block only (restored after)."""
    mm, cd = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = mm, cd


class LowPrecision:
    """Products of a delta mode: ``mode`` "tf32" or "bf16"; ``native``: the hardware's kernels
    (bf16 anywhere, TF32 on CUDA only) instead of rounding operands and multiplying in float32."""

    def __init__(self, mode: str, native: bool = False, device_type: str = "cpu"):
        if mode not in MODES:
            raise ValueError(f"low precision {mode!r} is not one of {MODES}")
        self.mode = mode
        self.native = bool(native) and (mode == "bf16" or device_type == "cuda")

    def _run(self, fn, *operands):
        if not self.native:
            rnd = round_tf32 if self.mode == "tf32" else round_bf16
            return fn(*(rnd(t) for t in operands))
        if self.mode == "bf16":
            return fn(*(t.to(torch.bfloat16) for t in operands)).to(torch.float32)
        with _cuda_tf32():
            return fn(*operands)

    def bmm(self, a, b):
        return self._run(torch.bmm, a, b)

    def linear(self, x, w):
        return self._run(F.linear, x, w)

    def conv(self, mod, x):
        """The convolution of module ``mod`` without its bias (a difference has none)."""
        return self._run(lambda t, w: mod._conv_forward(t, w, None), x, mod.weight)


# ---- exact differences ---------------------------------------------------------------------

def relu_delta(h, d):
    """relu(h + d) - relu(h) without cancellation: max(d, -h) where h > 0, else relu(h + d)."""
    return torch.where(h > 0, torch.maximum(d, -h), (h + d).clamp_(min=0))


def diff64(f, h, d, Q):
    """f(h + d) - f(h) in float64, cast to float32: h (1 or Q, B, ...), d (Q, B, ...) -> (Q*B, ...)."""
    B = d.shape[1]
    h64 = h.double()
    hp = (h64 + d.double()).reshape(Q * B, *d.shape[2:])
    fb = f(h64.reshape(h.shape[0] * B, *h.shape[2:]))
    fp = f(hp)
    return sub64(fp, fb, Q)


def sub64(fp, fb, Q):
    """Per-copy difference of stacked outputs ``fp`` (Q*B, ...) from ``fb`` (B, ...) or (Q*B, ...), float32."""
    if isinstance(fp, (tuple, list)):
        return tuple(None if a is None else sub64(a, b, Q) for a, b in zip(fp, fb))
    fpv = fp.reshape(Q, -1, *fp.shape[1:])
    fbv = fb.reshape(-1, fpv.shape[1], *fb.shape[1:])
    return (fpv - fbv).to(torch.float32).reshape(fp.shape)


def bn_delta(x, d, eps, w):
    """BatchNorm (batch statistics) of x + d minus that of x, in float32 without cancellation.

    x (1 or Q, B, C, ...), d (Q, B, C, ...); w None, (C,) or per copy (Q, C). With c = x - mean,
    e = d - mean(d), r = 1/sqrt(var + eps): the variance moves by dv = mean(e (2c + e)) and
    ``xhat(x + d) - xhat(x) = e r' + c (r' - r)``, ``r' - r = -dv r r' / (1/r + 1/r')``: every
    term is a product with e or dv, so errs relative to the difference, never to x.
    Float32 out, d's shape.
    """
    dims = (1,) + tuple(range(3, d.dim()))
    c = x - x.mean(dim=dims, keepdim=True)
    a = c.square().mean(dim=dims, keepdim=True) + eps  # var + eps
    e = d - d.mean(dim=dims, keepdim=True)
    dv = (e * (2 * c + e)).mean(dim=dims, keepdim=True)
    r, r2 = torch.rsqrt(a), torch.rsqrt(a + dv)
    dr = -dv * r * r2 / (torch.sqrt(a) + torch.sqrt(a + dv))
    out = e * r2 + c * dr
    if w is not None:
        shp = (w.shape[0] if w.dim() == 2 else 1, 1, -1) + (1,) * (d.dim() - 3)
        out.mul_(w.view(shp))
    return out


def binary_delta(op, bases, deltas):
    """Δ of op(a, b) from base operands and their Δ (None: unchanged), without cancellation.

    add/sub: Δa ± Δb; mul: Δa b + a Δb + Δa Δb; div: (Δa b - a Δb) / (b (b + Δb)).
    """
    (a, b), (da, db) = bases, deltas
    if op is torch.add or op is torch.sub:
        if db is None:
            return da
        db = db if op is torch.add else -db
        return db if da is None else da + db
    if op is torch.mul:
        out = None if da is None else da * b
        if db is not None:
            out = a * db if out is None else out + a * db
            if da is not None:
                out = out + da * db
        return out
    if db is None:
        return da / b
    num = -(a * db) if da is None else da * b - a * db
    return num / (b * (b + db))


__all__ = ["LowPrecision", "MODES", "bn_delta", "binary_delta", "diff64", "relu_delta", "round_bf16",
           "round_tf32", "sub64"]
