"""LIZO / ReLIZO: a linear-interpolation zeroth-order optimizer that reuses earlier queries.

At the iterate ``x`` the optimizer holds ``n`` sample points ``y_i`` with known losses.
Their offsets ``v_i = y_i - x`` are the rows of ``V``; the gradient estimate is the
minimum-norm ``g`` with ``v_i . g = f(y_i) - f(x)`` for every row::

    g = V^T (V V^T)^+ (f(Y) - f(x))

(the same as ``U^T (U U^T)^+ delta`` with unit rows ``u_i = v_i / s_i`` and
``delta_i = (f(x + s_i u_i) - f(x)) / s_i``). Points queried in earlier steps that lie
within ``reuse_distance_bound`` of the new iterate are reused as rows, so only the rest
of the ``n`` rows cost a query. Moving from ``x`` to ``x'`` changes every kept offset by
the same ``d = x - x'``, hence the Gram matrix of the kept points changes by a rank-2
update plus a constant, ``G' = G + a 1^T + 1 a^T + |d|^2 1 1^T`` with ``a = V d``; only
inner products that involve new rows are computed afresh.

Everything the trajectory depends on lives in ``optimizer.state`` (under the first
trainable parameter), so ``state_dict`` / ``load_state_dict`` continue a run bit for bit.
With a ``comm`` the fresh queries of a step are split over the ranks; only loss values
travel, and every rank takes the same step.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.optim import Optimizer

from ._queries import QueryRunner, first_trainable_index, flat, trainable, write

log = logging.getLogger("zohpc.optim.lizo")

# optimizer.state keys (all tensors, so a checkpoint writer can store them as arrays)
K_RNG = "lizo_rng"  # uint8: torch.Generator state of the direction sampler
K_X = "lizo_x"  # (d,) param dtype: the iterate the history offsets and Gram refer to
K_POINTS = "lizo_points"  # (m, d) param dtype: absolute query points kept for reuse
K_LOSSES = "lizo_losses"  # (m,) float64: their losses
K_GRAM = "lizo_gram"  # (m, m) float64: Gram matrix of the offsets points - x
K_COUNTERS = "lizo_counters"  # int64: see COUNTER_NAMES
_EXACT_KEYS = (K_RNG, K_X, K_POINTS, K_LOSSES, K_GRAM, K_COUNTERS)

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


class LIZO(Optimizer):
    """ReLIZO's linear-interpolation ZO optimizer with query reuse (``torch.optim`` API).

    ``step(closure)``: ``closure()`` returns the loss at the current parameters (no
    backward). Per-group options: ``lr`` and ``weight_decay``; everything else is global.

    Args:
        lr: step size; the step of each group's slice is ``lr_group * (g + wd * x)``.
        num_sample_per_step: rows ``n`` of the interpolation system per step.
        reuse_distance_bound: reuse earlier points within this distance of the iterate;
            ``None`` (or 0) means ``2 * max(group lr)``, re-read every step.
        max_reuse_rate: at most ``floor(max_reuse_rate * n)`` rows are reused per step.
        orthogonal_sample: fresh directions orthonormal (QR of a Gaussian) instead of
            independent normalized Gaussians.
        sample_norm: length of the fresh offsets (the finite-difference step).
        weight_decay: L2 penalty ``wd/2 |x|^2`` added to the objective (its exact gradient
            ``wd * x`` is added to the estimate, and the line search tests the penalized loss).
        line_search: backtracking Armijo search along ``-D (g + wd x)``, ``D`` the per-group lr:
            accept the first ``tau = 1, beta, beta^2, ...`` with
            ``F(x - tau D g) <= F(x) - ls_c * tau * g^T D g`` and ``F`` strictly lower;
            if none of ``ls_max_backtracks + 1`` trials passes, the parameters stay.
        history_size: at most this many earlier points are kept (default ``2 n + 1``).
        recompute_gram: recompute Gram matrices from the offsets (for testing the
            analytic update).
        gram_rcond: eigenvalues below ``gram_rcond * max`` make the Gram matrix
            ill-conditioned: reused rows are then replaced by fresh ones, and a system that
            is still ill-conditioned is solved by truncated pseudo-inverse.
        comm: a :class:`zohpc.comm.Comm`; the queries of a step are split over its ranks.
        seed: seed of the direction sampler (every rank draws the same directions).
    """

    def __init__(
        self,
        params,
        lr: float,
        num_sample_per_step: int = 8,
        reuse_distance_bound: float | None = None,
        max_reuse_rate: float = 0.5,
        orthogonal_sample: bool = False,
        sample_norm: float = 5e-3,
        weight_decay: float = 0.0,
        line_search: bool = False,
        ls_c: float = 1e-4,
        ls_beta: float = 0.5,
        ls_max_backtracks: int = 10,
        history_size: int | None = None,
        recompute_gram: bool = False,
        gram_rcond: float = 1e-8,
        comm=None,
        seed: int = 0,
    ):
        if not lr > 0:
            raise ValueError(f"LIZO: lr must be > 0, got {lr}")
        if num_sample_per_step < 1:
            raise ValueError(f"LIZO: num_sample_per_step must be >= 1, got {num_sample_per_step}")
        if reuse_distance_bound is not None and reuse_distance_bound < 0:
            raise ValueError(f"LIZO: reuse_distance_bound must be >= 0, got {reuse_distance_bound}")
        if not 0.0 <= max_reuse_rate <= 1.0:
            raise ValueError(f"LIZO: max_reuse_rate must be in [0, 1], got {max_reuse_rate}")
        if not sample_norm > 0:
            raise ValueError(f"LIZO: sample_norm must be > 0, got {sample_norm}")
        if weight_decay < 0:
            raise ValueError(f"LIZO: weight_decay must be >= 0, got {weight_decay}")
        if not (0 < ls_c < 1 and 0 < ls_beta < 1 and ls_max_backtracks >= 0):
            raise ValueError("LIZO: need 0 < ls_c < 1, 0 < ls_beta < 1, ls_max_backtracks >= 0")
        if history_size is not None and history_size < 0:
            raise ValueError(f"LIZO: history_size must be >= 0, got {history_size}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.num_sample_per_step = int(num_sample_per_step)
        self.reuse_distance_bound = reuse_distance_bound or None
        self.max_reuse_rate = float(max_reuse_rate)
        self.orthogonal_sample = bool(orthogonal_sample)
        self.sample_norm = float(sample_norm)
        self.line_search = bool(line_search)
        self.ls_c, self.ls_beta, self.ls_max_backtracks = float(ls_c), float(ls_beta), int(ls_max_backtracks)
        self.history_size = 2 * self.num_sample_per_step + 1 if history_size is None else int(history_size)
        self.recompute_gram = bool(recompute_gram)
        self.gram_rcond = float(gram_rcond)
        self.comm = comm
        self.seed = int(seed)
        self._gen = torch.Generator(device="cpu")
        self._runner = QueryRunner(comm)
        self.last_step_stats: dict = {}
        self.last_gram: torch.Tensor | None = None  # the system Gram matrix of the last step
        self.last_offsets: torch.Tensor | None = None  # its rows (float64 offsets from the iterate)
        self.last_grad: torch.Tensor | None = None  # the last estimate g (float64, without weight decay)

    # ------------------------------------------------------------------ layout and state
    def _params(self) -> list[torch.Tensor]:
        return trainable(self.param_groups)

    def _group_vectors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-coordinate lr and weight decay (float64), read from the groups every step."""
        key = tuple((float(g["lr"]), float(g["weight_decay"])) for g in self.param_groups)
        if getattr(self, "_vectors_key", None) == key:
            return self._vectors
        lrs, wds = [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    lrs.append(torch.full((p.numel(),), float(group["lr"]), dtype=torch.float64))
                    wds.append(torch.full((p.numel(),), float(group["weight_decay"]), dtype=torch.float64))
        self._vectors_key, self._vectors = key, (torch.cat(lrs), torch.cat(wds))
        return self._vectors

    _flat = staticmethod(flat)
    _write = staticmethod(write)

    def _state(self, params) -> dict:
        p0 = params[0]
        st = self.state[p0]
        if K_RNG not in st:
            dim = sum(p.numel() for p in params)
            gen = torch.Generator(device="cpu")
            gen.manual_seed(self.seed)
            st[K_RNG] = gen.get_state()
            st[K_X] = torch.empty(0, dtype=p0.dtype, device=p0.device)
            st[K_POINTS] = torch.empty(0, dim, dtype=p0.dtype, device=p0.device)
            st[K_LOSSES] = torch.empty(0, dtype=torch.float64, device=p0.device)
            st[K_GRAM] = torch.empty(0, 0, dtype=torch.float64, device=p0.device)
            st[K_COUNTERS] = torch.zeros(len(COUNTER_NAMES), dtype=torch.int64)
        return st

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps the float64 history exactly (torch casts it to the param dtype)."""
        super().load_state_dict(state_dict)
        src = state_dict["state"].get(first_trainable_index(self.param_groups))
        if src is None or K_RNG not in src:
            return
        p0 = self._params()[0]
        st = self.state[p0]
        for key in _EXACT_KEYS:
            device = "cpu" if key in (K_RNG, K_COUNTERS) else p0.device
            st[key] = src[key].detach().clone().to(device)

    def counters(self) -> dict:
        """Cumulative statistics (identical on every rank): see ``COUNTER_NAMES``."""
        params = self._params()
        st = self.state.get(params[0], {})
        values = st.get(K_COUNTERS)
        if values is None:
            return {name: 0 for name in COUNTER_NAMES}
        return {name: int(v) for name, v in zip(COUNTER_NAMES, values.tolist())}

    @property
    def reuse_rate(self) -> float:
        """Fraction of sample rows that were reused instead of queried."""
        c = self.counters()
        total = c["reused"] + c["fresh"]
        return c["reused"] / total if total else 0.0

    @property
    def num_queries(self) -> int:
        """Closure evaluations so far, over all ranks together."""
        return self.counters()["queries"]

    queries_made = num_queries  # the name zohpc.train reads

    # ------------------------------------------------------------------ sampling and queries
    def sample_directions(self, k: int, dim: int) -> torch.Tensor:
        """``k`` fresh offsets (rows, float64 on the CPU) of length ``sample_norm``.

        Drawn from the optimizer's own generator, so every rank draws the same rows.
        Subclasses may override it (tests force coordinate or duplicate directions).
        """
        if k == 0:
            return torch.empty(0, dim, dtype=torch.float64)
        z = torch.randn(k, dim, generator=self._gen, dtype=torch.float64)
        if self.orthogonal_sample:
            if k > dim:
                raise ValueError(f"LIZO: orthogonal_sample needs num_sample_per_step <= {dim} (the dimension)")
            q, r = torch.linalg.qr(z.T)
            signs = torch.sign(torch.diagonal(r))
            signs[signs == 0] = 1.0
            rows = (q * signs).T
        else:
            rows = z / z.norm(dim=1, keepdim=True)
        return rows * self.sample_norm

    @property
    def closure_seconds(self) -> float:
        """Time spent inside ``closure()`` on this rank (step time minus this is the overhead)."""
        return self._runner.closure_seconds

    def _evaluate(self, closure, params, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self._runner.evaluate(closure, params, x, points)

    # ------------------------------------------------------------------ linear algebra
    @staticmethod
    def _finite_rows(rhs: torch.Tensor):
        """Mask of usable rows (finite loss difference), or None when all are usable."""
        good = torch.isfinite(rhs)
        return None if bool(good.all()) else good

    @staticmethod
    def _rows(t: torch.Tensor, good, square: bool = False) -> torch.Tensor:
        if good is None:
            return t
        return t[good][:, good] if square else t[good]

    def _solve(self, gram: torch.Tensor, rhs: torch.Tensor, dim: int):
        """``(gram^+ rhs, well_conditioned)`` by eigendecomposition; ``(None, False)`` if unusable.

        Well conditioned means rank ``min(rows, dim)`` at tolerance ``gram_rcond``: with more
        rows than dimensions the Gram matrix is singular by construction, and that is fine.
        """
        if gram.numel() == 0 or not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
            return None, False
        evals, evecs = torch.linalg.eigh(gram)
        lmax = evals[-1]
        if not lmax > 0:
            return None, False
        keep = evals > self.gram_rcond * lmax
        q = evecs[:, keep]
        coef = q @ ((q.T @ rhs) / evals[keep])
        if not torch.isfinite(coef).all():
            return None, False
        return coef, int(keep.sum()) >= min(gram.shape[0], dim)

    @staticmethod
    def _shift_gram(gram: torch.Tensor, offsets: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
        """Gram matrix after every offset row gains ``d``: ``G + a 1^T + 1 a^T + |d|^2 1 1^T``."""
        a = offsets @ d
        return gram + a[:, None] + a[None, :] + torch.dot(d, d)

    def _shift_history(self, st: dict, x_from: torch.Tensor, x_to: torch.Tensor) -> None:
        """Re-anchor the kept points from iterate ``x_from`` to ``x_to`` (analytically)."""
        if st[K_LOSSES].numel():
            offsets = st[K_POINTS].double() - x_from.double()
            d = x_from.double() - x_to.double()
            if self.recompute_gram:
                new_off = st[K_POINTS].double() - x_to.double()
                st[K_GRAM] = new_off @ new_off.T
            else:
                st[K_GRAM] = self._shift_gram(st[K_GRAM], offsets, d)
        st[K_X] = x_to.clone()

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None):
        """One LIZO step; returns the loss at the iterate before the step (a float)."""
        if closure is None:
            raise ValueError("LIZO.step needs a closure that returns the loss (no backward)")
        params = self._params()
        st = self._state(params)
        self._gen.set_state(st[K_RNG].cpu())
        counters = st[K_COUNTERS]
        stats = dict(queries=0, reused=0, fresh=0, line_search_queries=0, fallback=False, pinv=False,
                     failed=False, line_search_accepted=None)
        x = self._flat(params)
        dim = x.numel()
        if st[K_X].numel() and not torch.equal(st[K_X], x):
            self._shift_history(st, st[K_X], x)  # parameters changed outside step()
        x64 = x.double()
        lr_vec, wd_vec = self._group_vectors()
        lr_vec, wd_vec = lr_vec.to(x.device), wd_vec.to(x.device)
        n = self.num_sample_per_step
        bound = self.reuse_distance_bound
        if bound is None:
            bound = 2.0 * max(float(g["lr"]) for g in self.param_groups)

        # ---- choose the reused rows: nearest kept points within the bound
        losses_h, gram_h, points_h = st[K_LOSSES], st[K_GRAM], st[K_POINTS]
        r_max = min(n, int(math.floor(self.max_reuse_rate * n + 1e-9)))
        reuse = torch.empty(0, dtype=torch.long, device=x.device)
        if losses_h.numel() and r_max > 0:
            dist2 = torch.diagonal(gram_h)
            ok = torch.isfinite(losses_h) & (dist2 <= bound * bound) & (dist2 > (1e-2 * self.sample_norm) ** 2)
            cand = torch.nonzero(ok).flatten()
            if cand.numel():
                order = torch.argsort(dist2[cand], stable=True)
                reuse = cand[order[:r_max]]
        r = reuse.numel()

        # ---- fresh rows and their queries (the base query x first)
        fresh_dirs = self.sample_directions(n - r, dim).to(x.device)
        pts_f = (x64 + fresh_dirs).to(x.dtype)
        values = self._evaluate(closure, params, x, torch.cat([x[None], pts_f]))
        stats["queries"] += values.numel()
        f0 = float(values[0])
        pts_r = points_h[reuse]
        loss_r = losses_h[reuse]
        loss_f = values[1:].to(x.device)
        off_r = pts_r.double() - x64
        off_f = pts_f.double() - x64

        def assemble(off_r, off_f, gram_rr):
            if self.recompute_gram:
                v = torch.cat([off_r, off_f])
                return v @ v.T
            g_rf = off_r @ off_f.T
            g_ff = off_f @ off_f.T
            return torch.cat([torch.cat([gram_rr, g_rf], 1), torch.cat([g_rf.T, g_ff], 1)])

        gram = assemble(off_r, off_f, gram_h[reuse][:, reuse])
        coef = None
        if math.isfinite(f0):
            rhs = torch.cat([loss_r, loss_f]) - f0
            good = self._finite_rows(rhs)
            coef, well = self._solve(self._rows(gram, good, True), self._rows(rhs, good), dim)
            if (coef is None or not well) and r > 0:
                # the reused rows made the system (nearly) singular: replace them by fresh rows
                stats["fallback"] = True
                extra = self.sample_directions(r, dim).to(x.device)
                pts_e = (x64 + extra).to(x.dtype)
                vals_e = self._evaluate(closure, params, x, pts_e).to(x.device)
                stats["queries"] += vals_e.numel()
                pts_f = torch.cat([pts_f, pts_e])
                loss_f = torch.cat([loss_f, vals_e])
                off_f = pts_f.double() - x64
                reuse = reuse[:0]
                r = 0
                pts_r, loss_r, off_r = pts_r[:0], loss_r[:0], off_r[:0]
                gram = assemble(off_r, off_f, gram_h[:0, :0])
                rhs = loss_f - f0
                good = self._finite_rows(rhs)
                coef, well = self._solve(self._rows(gram, good, True), self._rows(rhs, good), dim)
            if coef is not None and not well:
                stats["pinv"] = True
        stats["reused"], stats["fresh"] = r, pts_f.shape[0]
        self.last_gram = gram

        # ---- the move
        x_new = x
        self.last_offsets = None
        self.last_grad = torch.zeros_like(x64)
        if coef is None:
            stats["failed"] = True
        else:
            off_sys = torch.cat([off_r, off_f])
            off_sys = self._rows(off_sys, good)
            grad = off_sys.T @ coef
            self.last_offsets, self.last_grad = off_sys, grad
            grad_tot = grad + wd_vec * x64
            direction = lr_vec * grad_tot
            if self.line_search:
                x_new = self._line_search(closure, params, x, x64, f0, grad_tot, direction, wd_vec, stats)
            else:
                x_new = (x64 - direction).to(x.dtype)
            if self.comm is not None and self.comm.size > 1:
                self.comm.bcast_(x_new)  # guard against rank-to-rank rounding differences
            self._write(params, x_new)

        # ---- history: [old iterate x, fresh rows, reused rows, older kept points], re-anchored at x_new
        if math.isfinite(f0):
            moved = not torch.equal(x_new, x)
            keep_r = torch.zeros(losses_h.numel(), dtype=torch.bool, device=x.device)
            keep_r[reuse] = True
            old = torch.nonzero(~keep_r & torch.isfinite(losses_h)).flatten()
            lead = (1 if moved else 0) + pts_f.shape[0] + r
            old = old[: max(0, self.history_size - lead)]
            pts_o = points_h[old]
            off_o = pts_o.double() - x64
            blocks_pts = ([x[None]] if moved else []) + [pts_f, pts_r, pts_o]
            blocks_loss = ([torch.tensor([f0], dtype=torch.float64, device=x.device)] if moved else []) + [
                loss_f, loss_r, losses_h[old]]
            new_pts = torch.cat(blocks_pts)
            new_loss = torch.cat(blocks_loss)
            offsets = torch.cat(([torch.zeros(1, dim, dtype=torch.float64, device=x.device)] if moved else [])
                                + [off_f, off_r, off_o])
            if self.recompute_gram:
                new_gram = offsets @ offsets.T
            else:
                # system Gram is ordered [r | f]; history wants [center | f | r | old]
                nf = off_f.shape[0]
                g_ff, g_rr, g_rf = gram[r:, r:], gram[:r, :r], gram[:r, r:]
                g_oo = gram_h[old][:, old]
                g_or = gram_h[old][:, reuse]
                g_of = off_o @ off_f.T
                m = new_loss.numel()
                new_gram = torch.zeros(m, m, dtype=torch.float64, device=x.device)
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
            limit = self.history_size
            new_pts, new_loss = new_pts[:limit], new_loss[:limit]
            new_gram, offsets = new_gram[:limit, :limit], offsets[:limit]
            st[K_POINTS], st[K_LOSSES], st[K_GRAM] = new_pts, new_loss, new_gram
            # re-anchor at the new iterate (x_old - x_new = d for every offset)
            if moved:
                d = x64 - x_new.double()
                if self.recompute_gram:
                    off_new = new_pts.double() - x_new.double()
                    st[K_GRAM] = off_new @ off_new.T
                else:
                    st[K_GRAM] = self._shift_gram(new_gram, offsets, d)
        st[K_X] = x_new.clone()
        st[K_RNG] = self._gen.get_state()

        counters[0] += 1
        counters[1] += stats["queries"] + stats["line_search_queries"]
        counters[2] += stats["reused"]
        counters[3] += stats["fresh"]
        counters[4] += stats["line_search_queries"]
        counters[5] += int(stats["fallback"])
        counters[6] += int(stats["pinv"])
        counters[7] += int(stats["failed"])
        stats["loss"] = f0
        self.last_step_stats = stats
        if log.isEnabledFor(logging.DEBUG):
            log.debug("lizo step %d: loss %.6g queries %d reused %d fresh %d ls %d fallback %s pinv %s",
                      int(counters[0]), f0, stats["queries"] + stats["line_search_queries"], stats["reused"],
                      stats["fresh"], stats["line_search_queries"], stats["fallback"], stats["pinv"])
        return f0

    def _line_search(self, closure, params, x, x64, f0, grad_tot, direction, wd_vec, stats):
        """Backtracking Armijo on F = f + wd/2 |x|^2; returns the accepted point or ``x``."""
        slope = float(torch.dot(grad_tot, direction))
        if not (slope > 0 and math.isfinite(slope)):
            return x
        penalty = (lambda z: 0.5 * float(torch.dot(wd_vec, z * z))) if bool((wd_vec > 0).any()) else (lambda z: 0.0)
        big_f0 = f0 + penalty(x64)
        taus = [self.ls_beta ** k for k in range(self.ls_max_backtracks + 1)]
        chunk = self.comm.size if self.comm is not None else 1
        for first in range(0, len(taus), chunk):
            batch = taus[first:first + chunk]
            trials = torch.stack([(x64 - tau * direction).to(x.dtype) for tau in batch])
            vals = self._evaluate(closure, params, x, trials)
            stats["line_search_queries"] += vals.numel()
            for tau, trial, val in zip(batch, trials, vals.tolist()):
                big_f = val + penalty(trial.double())
                if math.isfinite(big_f) and big_f < big_f0 and big_f <= big_f0 - self.ls_c * tau * slope:
                    stats["line_search_accepted"] = tau
                    return trial
        return x
