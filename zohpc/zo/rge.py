"""The one RGE core of zohpc: random directions regenerated from the seed, evaluated stacked.

Used by the RGE training step, by ZO-GraSP (:mod:`zohpc.prune`) and by the ZO-SGD family
(:mod:`zohpc.optim.zosgd`).

Directions. Direction ``j`` of a draw named by ``seed_parts`` (training: ``(seed, step)``)
is ``u_j = z / ||z||`` with ``z`` the ``dim`` float32 normals of the generator
``zohpc.seeding.generator(tag, *seed_parts, j, device=...)`` (default tag ``"rge-direction"``),
widened to float64 before normalizing. Directions are drawn on the device of the parameters
(the evaluator's ``device``): a GPU run never copies ``dim``-sized blocks from the host. A
direction depends on ``(tag, seed_parts, j, dim)`` and the device type only: any rank, any
dtype, any block layout, any later re-generation on the same device type gives the same
vector, so directions are never held ``q x dim`` at once (they are made again where needed,
in blocks of at most one stacked pass). CPU and CUDA generators draw different normals: a
run resumed on the other device type continues with other (equally valid) directions.

Scaling convention (the only place it is defined, :func:`rge_coefficients`)::

    g = (dim / q) * sum_j  D_j * u_j,     D_j = (f(x + mu u_j) - f(x)) / mu   (forward)
                                           D_j = (f(x + mu u_j) - f(x - mu u_j)) / (2 mu)  (central)

Unit directions have ``E[u u^T] = I / dim``, so the ``dim / q`` factor makes ``g`` an
unbiased estimate of the gradient of the sphere-smoothed loss (-> the gradient as mu -> 0):
a learning rate means what it means for SGD, and ZO and autograd quantities (GraSP's
scores) are on one scale. DeepZero's unscaled form is ``g / dim``.

Distribution. The ``q`` directions split into contiguous blocks over the ranks
(:func:`contiguous_split`, bounds on multiples of the evaluator's stacked pass so the same
directions share a pass whatever the rank count: bit-identical estimates); only loss values
travel (:func:`sharded_losses`).
"""

from __future__ import annotations

import torch

from ..seeding import generator
from ..sharding import contiguous_split
from ..stop import no_check

TAG = "rge-direction"


def direction(dim: int, seed_parts: tuple, j: int, tag: str = TAG, device="cpu") -> torch.Tensor:
    """Unit direction ``u_j`` (float64, on ``device``) over ``dim`` coordinates (see the module docstring)."""
    dev = torch.device(device)
    z = torch.randn(int(dim), generator=generator(tag, *seed_parts, int(j), device=dev), dtype=torch.float32,
                    device=dev).double()
    return z.div_(torch.linalg.vector_norm(z))


def directions(dim: int, seed_parts: tuple, lo: int, hi: int, tag: str = TAG, device="cpu") -> torch.Tensor:
    """Rows ``u_lo .. u_{hi-1}``: a ``(hi - lo, dim)`` float64 block on ``device`` (keep ``hi - lo`` small)."""
    out = torch.empty(max(0, hi - lo), int(dim), dtype=torch.float64, device=device)
    for k, j in enumerate(range(lo, hi)):
        out[k] = direction(dim, seed_parts, j, tag, device)
    return out


def evaluator_device(evaluator) -> torch.device:
    """Where ``evaluator`` computes (its ``device``; the CPU if it does not say)."""
    return torch.device(getattr(evaluator, "device", "cpu"))


@torch.no_grad()
def rge_losses(evaluator, dim: int, seed_parts: tuple, lo: int, hi: int, mu: float, scatter=None,
               check=no_check, tag: str = TAG) -> torch.Tensor:
    """Losses ``f(x + mu u_j)`` for directions ``j`` in ``[lo, hi)``: a ``(hi - lo,)`` float64 tensor.

    ``evaluator``: a :class:`~zohpc.zo.stacked.StackedForward` (or anything with
    ``losses_of(deltas (K, D), check) -> (K,)`` and ``copies_per_pass``), prepared at ``x``.
    ``scatter`` maps a ``(K, dim)`` block of directions to ``(K, D)`` full-parameter
    perturbations (e.g. :func:`active_scatter` for the active coordinates of a mask);
    None: dense, ``dim == D``. Blocks are aligned on multiples of the
    evaluator's ``copies_per_pass`` counted from direction 0, so a range starting on such a
    multiple is stacked the same way on every rank. ``mu < 0`` gives ``f(x - |mu| u_j)``.
    ``check`` is called between stacked passes (a stop check may raise StepAbandoned).
    """
    if hi < lo or lo < 0:
        raise ValueError(f"rge_losses: bad direction range [{lo}, {hi})")
    size = max(1, int(evaluator.copies_per_pass))
    out = torch.empty(hi - lo, dtype=torch.float64)
    dev = evaluator_device(evaluator)
    a = lo
    while a < hi:
        b = min(hi, (a // size + 1) * size)
        deltas = directions(dim, seed_parts, a, b, tag, dev).mul_(mu)
        if scatter is not None:
            deltas = scatter(deltas)
        out[a - lo:b - lo] = evaluator.losses_of(deltas, check).detach().to(device="cpu", dtype=torch.float64)
        a = b
    return out


def active_scatter(coords):
    """The ``scatter`` for the active coordinates of ``coords`` (a :class:`~zohpc.zo.coords.Coordinates`):
    ``(K, coords.total)`` rows -> ``(K, D)`` flat perturbations, zero on inactive coordinates."""
    starts = [0]
    for n in coords.numels:
        starts.append(starts[-1] + n)
    index = torch.cat([coords.indices(pi) + starts[pi] for pi in range(len(coords.numels))]
                      ) if coords.numels else torch.zeros(0, dtype=torch.long)
    D = starts[-1]
    placed = {}  # device -> index there (moved once)

    def scatter(block: torch.Tensor) -> torch.Tensor:
        if block.device not in placed:
            placed[block.device] = index.to(block.device)
        out = block.new_zeros(block.shape[0], D)
        out[:, placed[block.device]] = block
        return out

    return scatter


def rge_coefficients(differences: torch.Tensor, dim: int) -> torch.Tensor:
    """The scaling convention: ``(dim / q) * D_j`` for the ``q`` directional differences ``D_j``."""
    differences = torch.as_tensor(differences, dtype=torch.float64)
    return differences * (float(dim) / max(1, differences.numel()))


@torch.no_grad()
def rge_combine(coeffs: torch.Tensor, dim: int, seed_parts: tuple, dtype=torch.float64, tag: str = TAG,
                device=None) -> torch.Tensor:
    """``sum_j coeffs[j] u_j`` over ``dim`` coordinates (float64 accumulation in j order), then cast.

    Directions are regenerated one at a time on ``device`` (None: the CPU), which must be the
    device type the losses were evaluated on (the same directions): memory ``O(dim)``,
    whatever ``q``.
    """
    dev = torch.device(device if device is not None else "cpu")
    coeffs = torch.as_tensor(coeffs, dtype=torch.float64).reshape(-1).cpu().tolist()
    acc = torch.zeros(int(dim), dtype=torch.float64, device=dev)
    for j, c in enumerate(coeffs):
        acc.add_(direction(dim, seed_parts, j, tag, dev), alpha=c)
    return acc.to(dtype=dtype)


def sharded_losses(evaluator, dim: int, seed_parts: tuple, q: int, mu: float, comm=None, scatter=None,
                   check=no_check, tag: str = TAG) -> torch.Tensor:
    """All ``q`` losses ``f(x + mu u_j)`` on every rank: each rank evaluates its contiguous block
    (:func:`contiguous_split` on the evaluator's pass size) and one ``allgatherv`` of the float64
    values joins them. ``comm=None``: one process."""
    size = 1 if comm is None else comm.size
    rank = 0 if comm is None else comm.rank
    bounds = contiguous_split(q, size, max(1, int(evaluator.copies_per_pass)))
    def work():
        return rge_losses(evaluator, dim, seed_parts, bounds[rank], bounds[rank + 1], mu, scatter, check, tag)

    if size == 1:
        return work()
    # a stop on any rank is raised on every rank after the collective (all leave together)
    return comm.allgatherv_or_abandon(work, [bounds[r + 1] - bounds[r] for r in range(size)])
