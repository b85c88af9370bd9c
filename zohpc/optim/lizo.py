"""LIZO / ReLIZO: a linear-interpolation zeroth-order optimizer that reuses earlier queries.

At the iterate ``x`` the optimizer holds ``n`` sample points ``y_i`` with known losses.
Their offsets ``v_i = y_i - x`` are the rows of ``V``; the gradient estimate is the
minimum-norm ``g`` with ``v_i . g = f(y_i) - f(x)`` for every row::

    g = V^T (V V^T)^+ (f(Y) - f(x))  =  U^T (U U^T)^+ delta

with unit rows ``u_i = v_i / |v_i|`` and directional differences
``delta_i = (f(y_i) - f(x)) / |v_i|``. The system is solved in the unit-row form, so its
conditioning measures angles between rows, not the mix of lengths (a reused point may lie
a thousand times farther away than a fresh one). Points queried in earlier steps that lie
within ``reuse_distance_bound`` of the new iterate are reused as rows, so only the rest of
the ``n`` rows cost a query. Moving from ``x`` to ``x'`` changes every kept offset by the
same ``d = x - x'``, hence the Gram matrix of the kept points changes by a rank-2 update
plus a constant, ``G' = G + a 1^T + 1 a^T + |d|^2 1 1^T`` with ``a = V d``; only inner
products that involve new rows are computed afresh.

Everything the trajectory depends on lives in ``optimizer.state`` (under the first
trainable parameter), so ``state_dict`` / ``load_state_dict`` continue a run bit for bit.

With a ``comm`` the queries of a step are split over the ranks and only loss values travel.
Ranks may round differently (other thread counts, other BLAS paths), so no rank trusts its
own arithmetic for a decision that chooses a collective: the reused rows, the fallback
re-query, a failed step, the line-search chunks, and the estimate itself are the driver's
(rank 0), broadcast. Query points are then built elementwise from broadcast values, so
every rank evaluates the same points and takes the same step.
"""

from __future__ import annotations

import logging
import math

import torch
from torch.optim import Optimizer

from ._queries import QueryRunner, first_trainable_index, flat, trainable, write
from .line_search import armijo_search
from .lizo_history import (COUNTER_NAMES, K_COUNTERS, K_GRAM, K_LOSSES, K_POINTS, K_RNG, K_X, choose_reuse,
                           counters_of, init_state, load_exact, reanchor, record_step, update_history)
from .lizo_system import assemble_gram, draw_directions, finite_rows, solve_unit_rows, usable

log = logging.getLogger("zohpc.optim.lizo")

__all__ = ["LIZO", "COUNTER_NAMES", "K_GRAM", "K_LOSSES", "K_POINTS", "K_X", "REFERENCE_SAMPLE_STD"]

REFERENCE_SAMPLE_STD = 1e-5  # the public ReLIZO code's per-coordinate std of a fresh offset


def _check_options(lr, num_sample_per_step, reuse_distance_bound, max_reuse_rate, sample_norm, weight_decay,
                   ls_c, ls_beta, ls_max_backtracks, history_size) -> None:
    """One ValueError line naming the first LIZO option out of range."""
    if not lr > 0:
        raise ValueError(f"LIZO: lr must be > 0, got {lr}")
    if num_sample_per_step < 1:
        raise ValueError(f"LIZO: num_sample_per_step must be >= 1, got {num_sample_per_step}")
    if reuse_distance_bound is not None and not math.isfinite(reuse_distance_bound):
        raise ValueError(f"LIZO: reuse_distance_bound must be finite, got {reuse_distance_bound}")
    if not 0.0 <= max_reuse_rate <= 1.0:
        raise ValueError(f"LIZO: max_reuse_rate must be in [0, 1], got {max_reuse_rate}")
    if sample_norm is not None and not sample_norm > 0:
        raise ValueError(f"LIZO: sample_norm must be > 0, got {sample_norm}")
    if weight_decay < 0:
        raise ValueError(f"LIZO: weight_decay must be >= 0, got {weight_decay}")
    if not (0 < ls_c < 1 and 0 < ls_beta < 1 and ls_max_backtracks >= 0):
        raise ValueError("LIZO: need 0 < ls_c < 1, 0 < ls_beta < 1, ls_max_backtracks >= 0")
    if history_size is not None and history_size < 0:
        raise ValueError(f"LIZO: history_size must be >= 0, got {history_size}")


class LIZO(Optimizer):
    """ReLIZO's linear-interpolation ZO optimizer with query reuse (``torch.optim`` API).

    ``step(closure)``: ``closure()`` returns the loss at the current parameters (no
    backward). Per-group options: ``lr`` and ``weight_decay``; everything else is global.

    Args:
        lr: step size; the step of each group's slice is ``lr_group * (g + wd * x)``.
        num_sample_per_step: rows ``n`` of the interpolation system per step.
        reuse_distance_bound: reuse earlier points within this distance of the iterate;
            ``0`` disables reuse (as in ReLIZO); ``None`` or a negative value means
            ``2 * max(group lr)``, re-read every step (so it follows an lr schedule).
        max_reuse_rate: at most ``floor(max_reuse_rate * n)`` rows are reused per step.
        orthogonal_sample: fresh directions orthonormal (QR of a Gaussian) instead of
            independent normalized Gaussians.
        sample_norm: length of the fresh offsets (the finite-difference step); ``None``
            means ``1e-5 * sqrt(d)``, the expected length of the public ReLIZO code's
            offsets (Gaussian, std 1e-5 per coordinate), for ``d`` trainable values.
        weight_decay: L2 penalty ``wd/2 |x|^2`` added to the objective (its exact gradient
            ``wd * x`` is added to the estimate, and the line search tests the penalized loss).
        line_search: backtracking Armijo search along ``-D (g + wd x)``, ``D`` the per-group lr:
            accept the first ``tau = 1, beta, beta^2, ...`` with
            ``F(x - tau D g) <= F(x) - ls_c * tau * g^T D g`` and ``F`` strictly lower;
            if none of ``ls_max_backtracks + 1`` trials passes, the parameters stay.
        history_size: at most this many earlier points are kept (default ``2 n + 1``).
        recompute_gram: recompute Gram matrices from the offsets (for testing the
            analytic update).
        gram_rcond: eigenvalues of the unit-row Gram matrix below ``gram_rcond * max`` make
            it ill-conditioned: reused rows are then replaced by fresh ones, and a system
            that is still ill-conditioned is solved by truncated pseudo-inverse.
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
        sample_norm: float | None = None,
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
        _check_options(lr, num_sample_per_step, reuse_distance_bound, max_reuse_rate, sample_norm, weight_decay,
                       ls_c, ls_beta, ls_max_backtracks, history_size)
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.num_sample_per_step = int(num_sample_per_step)
        bound = None if reuse_distance_bound is None or reuse_distance_bound < 0 else float(reuse_distance_bound)
        self.reuse_distance_bound = bound
        self.max_reuse_rate = float(max_reuse_rate)
        self.orthogonal_sample = bool(orthogonal_sample)
        dim = sum(p.numel() for p in self._params())
        self.sample_norm = REFERENCE_SAMPLE_STD * math.sqrt(dim) if sample_norm is None else float(sample_norm)
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

    def _state(self, params) -> dict:
        return init_state(self.state[params[0]], params, self.seed)

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but keeps the float64 history exactly (torch casts it to the param dtype)."""
        super().load_state_dict(state_dict)
        src = state_dict["state"].get(first_trainable_index(self.param_groups))
        if src is None or K_RNG not in src:
            return
        p0 = self._params()[0]
        load_exact(self.state[p0], src, p0.device)

    def counters(self) -> dict:
        """Cumulative statistics (identical on every rank): see ``COUNTER_NAMES``."""
        return counters_of(self.state.get(self._params()[0], {}))

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

    def distance_bound(self) -> float:
        """The reuse bound of the next step (0: no reuse)."""
        if self.reuse_distance_bound is None:
            return 2.0 * max(float(g["lr"]) for g in self.param_groups)
        return self.reuse_distance_bound

    # ------------------------------------------------------------------ sampling and queries
    def sample_directions(self, k: int, dim: int) -> torch.Tensor:
        """``k`` fresh offsets (rows, float64 on the CPU) of length ``sample_norm``.

        Drawn from the optimizer's own generator, so every rank draws the same rows.
        Subclasses may override it (tests force coordinate or duplicate directions).
        """
        return draw_directions(self._gen, k, dim, self.orthogonal_sample, self.sample_norm)

    @property
    def query_check(self):
        """Called between this rank's queries of a batch (a stop check: it may raise
        ``zohpc.stop.StepAbandoned``, then every rank raises it after the batch's gather)."""
        return self._runner.check

    @query_check.setter
    def query_check(self, fn) -> None:
        self._runner.check = fn

    @property
    def closure_seconds(self) -> float:
        """Time spent inside ``closure()`` on this rank (step time minus this is the overhead)."""
        return self._runner.closure_seconds

    # ------------------------------------------------------------------ local decisions (only the driver's count)
    def _choose_reuse(self, st: dict, bound: float, r_max: int) -> torch.Tensor:
        """Indices of the kept points to reuse: the nearest within ``bound``, at most ``r_max``."""
        return choose_reuse(st, bound, r_max, 1e-2 * self.sample_norm)

    def _solve(self, gram: torch.Tensor, rhs: torch.Tensor, dim: int):
        """``(gram^+ rhs, well_conditioned)``: see :func:`.lizo_system.solve_unit_rows`."""
        return solve_unit_rows(gram, rhs, dim, self.gram_rcond)

    def _accept(self, big_f: float, big_f0: float, tau: float, slope: float) -> bool:
        """Armijo with strict decrease, on the penalized loss."""
        return math.isfinite(big_f) and big_f < big_f0 and big_f <= big_f0 - self.ls_c * tau * slope

    # ------------------------------------------------------------------ the step
    @torch.no_grad()
    def step(self, closure=None, check=None):
        """One LIZO step; returns the loss at the iterate before the step (a float).

        ``check()``: called between this rank's queries for this step only (a stop check,
        see :attr:`query_check`)."""
        if closure is None:
            raise ValueError("LIZO.step needs a closure that returns the loss (no backward)")
        if check is not None:
            saved, self._runner.check = self._runner.check, check
            try:
                return self.step(closure)
            finally:
                self._runner.check = saved
        params = self._params()
        st = self._state(params)
        self._gen.set_state(st[K_RNG].cpu())
        counters = st[K_COUNTERS]
        stats = dict(queries=0, reused=0, fresh=0, line_search_queries=0, fallback=False, pinv=False,
                     failed=False, line_search_accepted=None)
        x = flat(params)
        dim = x.numel()
        if st[K_X].numel() and not torch.equal(st[K_X], x):
            reanchor(st, st[K_X], x, self.recompute_gram)  # parameters changed outside step()
        x64 = x.double()
        lr_vec, wd_vec = self._group_vectors()
        lr_vec, wd_vec = lr_vec.to(x.device), wd_vec.to(x.device)
        n = self.num_sample_per_step
        losses_h, gram_h, points_h = st[K_LOSSES], st[K_GRAM], st[K_POINTS]

        # ---- the reused rows: the driver's choice (it fixes how many fresh queries follow)
        r_max = min(n, int(math.floor(self.max_reuse_rate * n + 1e-9)))
        reuse = self._choose_reuse(st, self.distance_bound(), r_max)
        if self._runner.ranks > 1 and r_max > 0:
            plan = [reuse.numel()] + reuse.tolist() + [-1] * (r_max - reuse.numel())
            plan = self._runner.agree(plan)
            reuse = torch.tensor(plan[1:1 + int(plan[0])], dtype=torch.long, device=x.device)
        r = reuse.numel()

        # ---- fresh rows and their queries (the base query x first)
        fresh_dirs = self.sample_directions(n - r, dim).to(x.device)
        pts_f = (x64 + fresh_dirs).to(x.dtype)
        values = self._runner.evaluate(closure, params, x, torch.cat([x[None], pts_f]))
        stats["queries"] += values.numel()
        f0 = float(values[0])  # every rank holds every value: f0 is agreed
        pts_r = points_h[reuse]
        loss_r = losses_h[reuse]
        loss_f = values[1:].to(x.device)
        off_r = pts_r.double() - x64
        off_f = pts_f.double() - x64
        gram = assemble_gram(off_r, off_f, gram_h[reuse][:, reuse], self.recompute_gram)

        coef, good, ok = None, None, False
        if math.isfinite(f0):
            rhs = torch.cat([loss_r, loss_f]) - f0
            good = finite_rows(rhs)
            coef, well = self._solve(usable(gram, good, True), usable(rhs, good), dim)
            ok, well = (bool(v) for v in self._runner.agree([coef is not None, well]))
            if not (ok and well) and r > 0:
                # the reused rows made the system (nearly) singular: replace them by fresh rows
                stats["fallback"] = True
                extra = self.sample_directions(r, dim).to(x.device)
                pts_e = (x64 + extra).to(x.dtype)
                vals_e = self._runner.evaluate(closure, params, x, pts_e).to(x.device)
                stats["queries"] += vals_e.numel()
                pts_f = torch.cat([pts_f, pts_e])
                loss_f = torch.cat([loss_f, vals_e])
                off_f = pts_f.double() - x64
                reuse = reuse[:0]
                r = 0
                pts_r, loss_r, off_r = pts_r[:0], loss_r[:0], off_r[:0]
                gram = assemble_gram(off_r, off_f, gram_h[:0, :0], self.recompute_gram)
                rhs = loss_f - f0
                good = finite_rows(rhs)
                coef, well = self._solve(usable(gram, good, True), usable(rhs, good), dim)
                ok, well = (bool(v) for v in self._runner.agree([coef is not None, well]))
            stats["pinv"] = ok and not well
        stats["reused"], stats["fresh"] = r, pts_f.shape[0]
        self.last_gram = gram

        # ---- the move: the driver's estimate, so every rank builds the same points
        x_new = x
        self.last_offsets = None
        self.last_grad = torch.zeros_like(x64)
        if not ok:
            stats["failed"] = True
        else:
            off_sys = usable(torch.cat([off_r, off_f]), good)
            grad = off_sys.T @ coef if coef is not None else torch.zeros_like(x64)
            grad = self._runner.agree_tensor(grad.contiguous())
            self.last_offsets, self.last_grad = off_sys, grad
            grad_tot = grad + wd_vec * x64
            direction = lr_vec * grad_tot
            if self.line_search:
                taus = [self.ls_beta ** k for k in range(self.ls_max_backtracks + 1)]
                x_new = armijo_search(self._runner, closure, params, x, x64, f0, grad_tot, direction, wd_vec, stats,
                                      taus, self._accept)
            else:
                x_new = (x64 - direction).to(x.dtype)
            write(params, x_new)

        # ---- history: [old iterate x, fresh rows, reused rows, older kept points], re-anchored at x_new
        if math.isfinite(f0):
            update_history(st, x, x64, x_new, f0, (pts_f, loss_f, off_f), (reuse, pts_r, loss_r, off_r), gram,
                           self.history_size, self.recompute_gram)
        st[K_X] = x_new.clone()
        st[K_RNG] = self._gen.get_state()

        record_step(counters, stats)
        stats["loss"] = f0
        self.last_step_stats = stats
        if log.isEnabledFor(logging.DEBUG):
            log.debug("lizo step %d: loss %.6g queries %d reused %d fresh %d ls %d fallback %s pinv %s",
                      int(counters[0]), f0, stats["queries"] + stats["line_search_queries"], stats["reused"],
                      stats["fresh"], stats["line_search_queries"], stats["fallback"], stats["pinv"])
        return f0
