"""LIZO's kept points: their layout in ``optimizer.state``, the reuse choice, the Gram bookkeeping.

Everything the trajectory depends on lives in these tensors (all tensors, so a checkpoint
writer can store them as arrays), hence ``state_dict`` / ``load_state_dict`` continue a run
bit for bit. Moving the iterate from ``x`` to ``x'`` changes every kept offset by the same
``d = x - x'``, so the Gram matrix of the kept points follows by a rank-2 update plus a
constant (:func:`shift_gram`); only inner products that involve new rows are computed afresh.
"""

from __future__ import annotations

import torch

from ..seeding import derive_seed

K_RNG = "lizo_rng"  # uint8: torch.Generator state of the direction sampler
K_X = "lizo_x"  # (d,) param dtype: the iterate the history offsets and Gram refer to
K_POINTS = "lizo_points"  # (m, d) param dtype: absolute query points kept for reuse
K_LOSSES = "lizo_losses"  # (m,) float64: their losses
K_GRAM = "lizo_gram"  # (m, m) float64: Gram matrix of the offsets points - x
K_COUNTERS = "lizo_counters"  # int64: see COUNTER_NAMES
EXACT_KEYS = (K_RNG, K_X, K_POINTS, K_LOSSES, K_GRAM, K_COUNTERS)

COUNTER_NAMES = (
    "steps",  # calls of step()
    "queries",  # closure evaluations over all ranks (base + fresh + line search + fallback)
    "reused",  # sample rows taken from earlier steps (no query)
    "fresh",  # sample rows queried afresh
    "line_search_queries",  # trial points evaluated by the line search
    "fallbacks",  # reused rows dropped and resampled because the Gram matrix was ill-conditioned
    "pinv_solves",  # systems solved by truncated pseudo-inverse (rank-deficient even when fresh)
    "failed_steps",  # steps with no usable estimate (non-finite base loss): parameters unchanged
)


def init_state(st: dict, params, seed: int) -> dict:
    """Fill an empty ``st`` (the first parameter's state): no kept points, a seeded sampler."""
    p0 = params[0]
    if K_RNG not in st:
        dim = sum(p.numel() for p in params)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(derive_seed("lizo-directions", seed))
        st[K_RNG] = gen.get_state()
        st[K_X] = torch.empty(0, dtype=p0.dtype, device=p0.device)
        st[K_POINTS] = torch.empty(0, dim, dtype=p0.dtype, device=p0.device)
        st[K_LOSSES] = torch.empty(0, dtype=torch.float64, device=p0.device)
        st[K_GRAM] = torch.empty(0, 0, dtype=torch.float64, device=p0.device)
        st[K_COUNTERS] = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64)
    return st


def load_exact(st: dict, src: dict, device) -> None:
    """Copy the kept tensors of ``src`` into ``st`` as they are (torch would cast them to the param dtype)."""
    for key in EXACT_KEYS:
        st[key] = src[key].detach().clone().to("cpu" if key in (K_RNG, K_COUNTERS) else device)


def counters_of(st: dict) -> dict:
    """The cumulative counters of ``st`` by name (zeros before the first step)."""
    values = st.get(K_COUNTERS)
    if values is None:
        return {name: 0 for name in COUNTER_NAMES}
    return {name: int(v) for name, v in zip(COUNTER_NAMES, values.tolist())}


def record_step(counters: torch.Tensor, stats: dict) -> None:
    """Add one step's ``stats`` to the counters (in ``COUNTER_NAMES`` order)."""
    counters[0] += 1
    counters[1] += stats["queries"] + stats["line_search_queries"]
    counters[2] += stats["reused"]
    counters[3] += stats["fresh"]
    counters[4] += stats["line_search_queries"]
    counters[5] += int(stats["fallback"])
    counters[6] += int(stats["pinv"])
    counters[7] += int(stats["failed"])


def choose_reuse(st: dict, bound: float, r_max: int, min_norm: float) -> torch.Tensor:
    """Indices of the kept points to reuse: the nearest within ``bound`` (and beyond ``min_norm``), at most ``r_max``."""
    losses_h, gram_h = st[K_LOSSES], st[K_GRAM]
    empty = torch.empty(0, dtype=torch.long, device=losses_h.device)
    if not (losses_h.numel() and r_max > 0 and bound > 0):
        return empty
    dist2 = torch.diagonal(gram_h)
    ok = torch.isfinite(losses_h) & (dist2 <= bound * bound) & (dist2 > min_norm ** 2)
    cand = torch.nonzero(ok).flatten()
    if not cand.numel():
        return empty
    order = torch.argsort(dist2[cand], stable=True)
    return cand[order[:r_max]]


def shift_gram(gram: torch.Tensor, offsets: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Gram matrix after every offset row gains ``d``: ``G + a 1^T + 1 a^T + |d|^2 1 1^T``."""
    a = offsets @ d
    return gram + a[:, None] + a[None, :] + torch.dot(d, d)


def reanchor(st: dict, x_from: torch.Tensor, x_to: torch.Tensor, recompute: bool) -> None:
    """Re-anchor the kept points from iterate ``x_from`` to ``x_to`` (analytically unless ``recompute``)."""
    if st[K_LOSSES].numel():
        offsets = st[K_POINTS].double() - x_from.double()
        d = x_from.double() - x_to.double()
        if recompute:
            new_off = st[K_POINTS].double() - x_to.double()
            st[K_GRAM] = new_off @ new_off.T
        else:
            st[K_GRAM] = shift_gram(st[K_GRAM], offsets, d)
    st[K_X] = x_to.clone()


def _history_gram(gram, gram_h, reuse, old, off_f, off_o, moved: bool, m: int, device) -> torch.Tensor:
    """The kept Gram matrix ``[center | f | r | old]`` from the system's ``[r | f]`` and the old history."""
    r, nf = reuse.numel(), off_f.shape[0]
    g_ff, g_rr, g_rf = gram[r:, r:], gram[:r, :r], gram[:r, r:]
    g_oo = gram_h[old][:, old]
    g_or = gram_h[old][:, reuse]
    g_of = off_o @ off_f.T
    new_gram = torch.zeros(m, m, dtype=torch.float64, device=device)
    c = 1 if moved else 0
    fs, rs, os_ = slice(c, c + nf), slice(c + nf, c + nf + r), slice(c + nf + r, m)
    new_gram[fs, fs] = g_ff
    new_gram[rs, rs] = g_rr
    new_gram[rs, fs] = g_rf
    new_gram[fs, rs] = g_rf.T
    new_gram[os_, os_] = g_oo
    new_gram[os_, rs] = g_or
    new_gram[rs, os_] = g_or.T
    new_gram[os_, fs] = g_of
    new_gram[fs, os_] = g_of.T
    return new_gram


def update_history(st: dict, x, x64, x_new, f0: float, fresh: tuple, reused: tuple, gram: torch.Tensor,
                   history_size: int, recompute: bool) -> None:
    """Keep ``[old iterate, fresh, reused, older]`` (at most ``history_size``), re-anchored at ``x_new``.

    ``fresh = (points, losses, offsets)`` and ``reused = (indices, points, losses, offsets)``
    are the step's rows; ``gram`` is its system Gram matrix, ordered ``[reused | fresh]``.
    """
    pts_f, loss_f, off_f = fresh
    reuse, pts_r, loss_r, off_r = reused
    losses_h, gram_h, points_h = st[K_LOSSES], st[K_GRAM], st[K_POINTS]
    dim = x.numel()
    moved = not torch.equal(x_new, x)
    keep_r = torch.zeros(losses_h.numel(), dtype=torch.bool, device=x.device)
    keep_r[reuse] = True
    old = torch.nonzero(~keep_r & torch.isfinite(losses_h)).flatten()
    lead = (1 if moved else 0) + pts_f.shape[0] + reuse.numel()
    old = old[: max(0, history_size - lead)]
    pts_o = points_h[old]
    off_o = pts_o.double() - x64
    new_pts = torch.cat(([x[None]] if moved else []) + [pts_f, pts_r, pts_o])
    new_loss = torch.cat(([torch.tensor([f0], dtype=torch.float64, device=x.device)] if moved else [])
                         + [loss_f, loss_r, losses_h[old]])
    offsets = torch.cat(([torch.zeros(1, dim, dtype=torch.float64, device=x.device)] if moved else [])
                        + [off_f, off_r, off_o])
    if recompute:
        new_gram = offsets @ offsets.T
    else:
        new_gram = _history_gram(gram, gram_h, reuse, old, off_f, off_o, moved, new_loss.numel(), x.device)
    limit = history_size
    new_pts, new_loss = new_pts[:limit], new_loss[:limit]
    new_gram, offsets = new_gram[:limit, :limit], offsets[:limit]
    st[K_POINTS], st[K_LOSSES], st[K_GRAM] = new_pts, new_loss, new_gram
    if moved:  # re-anchor at the new iterate (x_old - x_new = d for every offset)
        if recompute:
            off_new = new_pts.double() - x_new.double()
            st[K_GRAM] = off_new @ off_new.T
        else:
            st[K_GRAM] = shift_gram(new_gram, offsets, x64 - x_new.double())
