"""LIZO's interpolation system for one step: fresh rows, their Gram matrix and the solve.

The gradient estimate is ``g = V^T (V V^T)^+ (f(Y) - f(x))`` for the offsets ``V`` of the
step's rows; these pure functions build and solve that system, so :class:`zohpc.optim.LIZO`
only decides which rows enter it and what the ranks agree on.
"""

from __future__ import annotations

import torch


def draw_directions(gen: torch.Generator, k: int, dim: int, orthogonal: bool, norm: float) -> torch.Tensor:
    """``k`` offsets (rows, float64 on the CPU) of length ``norm`` drawn from ``gen``.

    Normalized Gaussians, or with ``orthogonal`` the orthonormal rows of a QR of a Gaussian.
    """
    if k == 0:
        return torch.empty(0, dim, dtype=torch.float64)
    z = torch.randn(k, dim, generator=gen, dtype=torch.float64)
    if orthogonal:
        if k > dim:
            raise ValueError(f"LIZO: orthogonal_sample needs num_sample_per_step <= {dim} (the dimension)")
        q, r = torch.linalg.qr(z.T)
        signs = torch.sign(torch.diagonal(r))
        signs[signs == 0] = 1.0
        rows = (q * signs).T
    else:
        rows = z / z.norm(dim=1, keepdim=True)
    return rows * norm


def assemble_gram(off_r: torch.Tensor, off_f: torch.Tensor, gram_rr: torch.Tensor, recompute: bool) -> torch.Tensor:
    """System Gram matrix of the rows ``[reused | fresh]``, reusing the kept ``gram_rr`` unless ``recompute``."""
    if recompute:
        v = torch.cat([off_r, off_f])
        return v @ v.T
    g_rf = off_r @ off_f.T
    g_ff = off_f @ off_f.T
    return torch.cat([torch.cat([gram_rr, g_rf], 1), torch.cat([g_rf.T, g_ff], 1)])


def finite_rows(rhs: torch.Tensor):
    """Mask of usable rows (finite loss difference), or None when all are usable."""
    good = torch.isfinite(rhs)
    return None if bool(good.all()) else good


def usable(t: torch.Tensor, good, square: bool = False) -> torch.Tensor:
    """The rows of ``t`` (rows and columns with ``square``) that :func:`finite_rows` kept."""
    if good is None:
        return t
    return t[good][:, good] if square else t[good]


def solve_unit_rows(gram: torch.Tensor, rhs: torch.Tensor, dim: int, rcond: float):
    """``(gram^+ rhs, well_conditioned)`` in the unit-row form; ``(None, False)`` if unusable.

    With ``D = diag(|v_i|)``: ``gram^+ rhs = D^-1 (D^-1 gram D^-1)^+ D^-1 rhs`` for a full-rank
    system; the truncation acts on the unit-row Gram matrix, whose eigenvalues do not depend
    on how far the rows reach. Well conditioned means rank ``min(rows, dim)`` at tolerance
    ``rcond``: with more rows than dimensions the matrix is singular by construction.
    """
    if gram.numel() == 0 or not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        return None, False
    norms = torch.diagonal(gram).sqrt()
    if not bool((norms > 0).all()):
        return None, False
    unit = gram / norms[:, None] / norms[None, :]
    evals, evecs = torch.linalg.eigh(unit)
    lmax = evals[-1]
    if not lmax > 0:
        return None, False
    keep = evals > rcond * lmax
    q = evecs[:, keep]
    coef = (q @ ((q.T @ (rhs / norms)) / evals[keep])) / norms
    if not torch.isfinite(coef).all():
        return None, False
    return coef, int(keep.sum()) >= min(gram.shape[0], dim)
