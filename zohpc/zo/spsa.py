"""SPSA at inference-level memory (MeZO's trick, restored exactly): Gaussian directions
``z_j`` regenerated from (seed, step, j, parameter) chunk by chunk, and perturbed weights
that exist only while a layer reads them.

Why not perturb in place and subtract again: ``(θ + μz) − μz ≠ θ`` in float32, so the
replicas and a resumed run would drift. Here the stored parameters are never written during
the queries: :func:`perturbed` gives every module that owns a trainable parameter a property
of the same name that returns ``W + s·μ·z`` computed on access (one temporary the size of that
weight, freed when the layer is done), so tied weights read the same perturbation wherever
they are used. Only parameters with ``requires_grad=True`` are perturbed (LoRA's frozen base
is read as stored).

Memory: parameters + one inference forward + the largest single weight (its perturbed
temporary; a weight read more than once per forward, such as a tied embedding, is held from
its first to its last read once :func:`perturbed` has seen it read twice) + two chunks of
:data:`CHUNK` floats per noise thread in the update. Momentum adds one buffer per trainable
parameter, Adam two.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from ..seeding import derive_seed

TAG = "spsa-direction"
CHUNK = 1 << 20  # elements per noise chunk: fixed, so every rank and every phase draws the same values


def _chunk_generator(seed_parts, j: int, index: int, chunk: int, device) -> torch.Generator:
    """Chunk ``chunk`` of direction ``j`` of parameter ``index`` has its own stream, so chunks
    can be drawn in any order, on any thread, and still give the same values."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(TAG, *seed_parts, int(j), int(index), int(chunk)))
    return gen


def _chunks(n: int) -> list[tuple[int, int, int]]:
    return [(c, a, min(n, a + CHUNK)) for c, a in enumerate(range(0, n, CHUNK))]


def fill_noise(out: torch.Tensor, seed_parts, j: int, index: int, chunk: int) -> torch.Tensor:
    """Fill ``out`` (the elements of one chunk) with that chunk of ``z_j``; returns ``out``."""
    return torch.randn(out.numel(), generator=_chunk_generator(seed_parts, j, index, chunk, out.device),
                       dtype=out.dtype, device=out.device, out=out)


_POOL: dict = {}


def _for_each_chunk(n: int, device, work) -> None:
    """Run ``work(chunk, start, stop)`` over the chunks of ``n`` elements. On the CPU the chunks
    run on up to ``torch.get_num_threads()`` threads (drawing the noise is serial per generator
    and would otherwise bound the step); every chunk writes only its own slice."""
    chunks = _chunks(n)
    workers = min(torch.get_num_threads(), len(chunks))
    if workers <= 1 or torch.device(device).type != "cpu":
        for c in chunks:
            work(*c)
        return
    pool = _POOL.get(workers)
    if pool is None:
        pool = _POOL[workers] = ThreadPoolExecutor(workers, thread_name_prefix="zohpc-spsa-noise")
    for f in [pool.submit(work, *c) for c in chunks]:
        f.result()


def perturbed_value(p: torch.Tensor, seed_parts, j: int, index: int, scale: float) -> torch.Tensor:
    """A new tensor ``p + scale * z_j`` (``p`` itself is only read)."""
    out = torch.empty(p.shape, dtype=p.dtype, device=p.device)
    flat, src = out.view(-1), p.detach().reshape(-1)

    def work(c, a, b):
        fill_noise(flat[a:b], seed_parts, j, index, c)
        flat[a:b].mul_(scale).add_(src[a:b])  # round(scale * z) first, as p + scale * z reads (no FMA)

    _for_each_chunk(flat.numel(), p.device, work)
    return out


def direction(p: torch.Tensor, seed_parts, j: int, index: int) -> torch.Tensor:
    """The whole direction ``z_j`` of one parameter (tests and references)."""
    return perturbed_value(torch.zeros_like(p), seed_parts, j, index, 1.0)


_SUBCLASSES: dict = {}


def _swapped_class(cls, names: tuple):
    key = (cls, names)
    if key not in _SUBCLASSES:
        def prop(name):
            return property(lambda self: self._zohpc_perturb(name))
        _SUBCLASSES[key] = type(cls.__name__, (cls,), {n: prop(n) for n in names})
    return _SUBCLASSES[key]


def trainable(model: nn.Module) -> list[torch.Tensor]:
    """The parameters SPSA acts on, in ``model.parameters()`` order (each once)."""
    return [p for p in model.parameters() if p.requires_grad]


@contextlib.contextmanager
def perturbed(model: nn.Module, seed_parts, j: int, scale: float, reread: dict | None = None):
    """Inside, the model computes at ``θ + scale·z_j`` over its trainable parameters; the
    stored parameters are untouched (see the module docstring). Not re-entrant.

    ``reread``: a dict the caller keeps across passes. A parameter that one forward of
    ``model`` reads more than once (a tied weight: GPT's embedding is read again by its output
    layer) is recorded with its number of reads, and later forwards compute its perturbed
    value once and hold it until its last read, instead of drawing its noise again at every
    read (same values). Reads are counted per call of ``model`` itself (a closure that runs
    several forwards, micro-batches, holds nothing across them)."""
    index = {id(p): i for i, p in enumerate(trainable(model))}
    reads: dict = {}
    held: dict = {}

    def remember():
        if reread is not None:
            reread.update((k, n) for k, n in reads.items() if n > 1)

    def new_forward(_module, _args):
        remember()
        reads.clear()
        held.clear()

    def value(p):
        key = id(p)
        n = reads[key] = reads.get(key, 0) + 1
        v = held.get(key)
        if v is None:
            v = perturbed_value(p, seed_parts, j, index[key], scale)
        if reread is not None and n < reread.get(key, 0):
            held[key] = v
        else:
            held.pop(key, None)  # its last read: freed when the layer is done with it
        return v

    swapped = []
    hook = model.register_forward_pre_hook(new_forward)
    for mod in model.modules():
        names = tuple(n for n, p in mod._parameters.items() if p is not None and id(p) in index)
        if not names:
            continue
        cls = mod.__class__
        mod.__class__ = _swapped_class(cls, names)
        own = {n: mod._parameters[n] for n in names}
        mod._zohpc_perturb = lambda name, own=own: value(own[name])
        swapped.append((mod, cls))
    try:
        yield
    finally:
        hook.remove()
        for mod, cls in swapped:
            mod.__class__ = cls
            del mod._zohpc_perturb
        held.clear()
        remember()


@torch.no_grad()
def update_(params, seed_parts, coeffs, lr: float, *, weight_decay: float = 0.0, state=None,
            momentum: float = 0.0, adam=None) -> None:
    """``θ ← θ − lr · u`` in place, chunk by chunk, with ``g = Σ_j coeffs[j] z_j`` (plus
    ``weight_decay · θ``) and ``u = g`` (SGD), the momentum buffer ``m ← momentum·m + g``, or
    Adam ``adam = (beta1, beta2, eps, t)``. ``state[i]``: the buffers of parameter i (created
    on first use). Every rank runs this with the same values and gets the same bits."""
    coeffs = [float(c) for c in coeffs]
    if not coeffs:
        return
    for i, p in enumerate(params):
        flat = p.detach().view(-1)
        st = state.setdefault(i, {}) if state is not None else {}
        if momentum > 0 and "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(flat)
        if adam is not None and "exp_avg" not in st:
            st["exp_avg"], st["exp_avg_sq"] = torch.zeros_like(flat), torch.zeros_like(flat)

        def work(c, a, b, i=i, flat=flat, st=st, p=p):
            g = fill_noise(torch.empty(b - a, dtype=p.dtype, device=p.device), seed_parts, 0, i, c).mul_(coeffs[0])
            if len(coeffs) > 1:
                z = torch.empty_like(g)
                for j in range(1, len(coeffs)):
                    g.add_(fill_noise(z, seed_parts, j, i, c), alpha=coeffs[j])
            if weight_decay:
                g.add_(flat[a:b], alpha=weight_decay)
            if adam is not None:
                beta1, beta2, eps, t = adam
                m, v = st["exp_avg"][a:b], st["exp_avg_sq"][a:b]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                denom = (v / (1 - beta2 ** t)).sqrt_().add_(eps)
                flat[a:b].addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
                return
            if momentum > 0:
                g = st["momentum_buffer"][a:b].mul_(momentum).add_(g)
            flat[a:b].add_(g, alpha=-lr)

        _for_each_chunk(flat.numel(), p.device, work)


def checksum(params) -> torch.Tensor:
    """Cheap replica fingerprint: float64 sums of each parameter and of its squares."""
    out = torch.zeros(2, dtype=torch.float64)
    for p in params:
        for chunk in p.detach().reshape(-1).split(CHUNK):  # never a float64 copy of a whole weight
            d = chunk.double()
            out[0] += d.sum().cpu()
            out[1] += (d * d).sum().cpu()
    return out
