"""The sparse-CGE step over MPI: every active coordinate one forward-difference query, the
coordinates sharded over the ranks in contiguous runs balanced by predicted cost."""

from __future__ import annotations

import math
import time

import torch

import logging

from ..errors import UserError
from ..stop import no_check
from ..zo import Coordinates, cge
from .protocol import Outcome, StepResult, apply_gradient, attempt, finish, settle, share_batch
from ..sharding import balanced_bounds, corrected_costs, shard_costs


log = logging.getLogger("zohpc.train")


class CGEStep:
    """Sparse CGE (DeepZero): ``g_i = (f(θ + μ e_i) − f(θ)) / μ`` for every active coordinate.

    ``engine``: a :class:`~zohpc.zo.QueryEngine` (per-layer feature reuse) or the full-forward
    fallback; ``features``: ``"recompute"`` (each rank runs the cached forward itself),
    ``"broadcast"`` (the driver's cached activations are broadcast; both give identical values)
    or ``"auto"`` (timed in :meth:`setup`). The driver steps ``optimizer`` on the estimate.
    ``progress(step)``: a callback factory for long steps on the driver (or None).
    """

    name = "cge"

    def __init__(self, comm, model, engine, optimizer=None, *, mu: float, difference: str = "forward",
                 features: str = "recompute", stop=None, progress=None):
        self.comm, self.model, self.engine, self.optimizer = comm, model, engine, optimizer
        self.mu, self.difference, self.stop, self.progress = mu, difference, stop, progress
        if not engine.shares_features:
            features = "recompute"  # the full-forward fallback caches no features to share
        self.features_choice = features
        self.features = "recompute" if features == "auto" else features
        self.coords: Coordinates | None = None
        self.costs: list[float] = []
        self.calibrated: list[float] = []
        self.bounds: list[int] = []
        self.rebalances_left = 0
        self.reuse_off_reason = None  # why the engine is the full-forward fallback (set by build_step)

    # ---- the shard layout -------------------------------------------------------------
    @property
    def granule(self) -> int:
        q = self.engine.query_batch
        return q if self.difference == "forward" else max(1, q // 2)

    def setup(self, coords: Coordinates, sample_batch) -> None:
        """New active coordinates: the query cost model (once per run, kept in the state),
        the shard layout, the feature mode, and two rebalancings after the next steps."""
        if not self.calibrated:
            self.calibrated = self.calibrate(coords, sample_batch)
        self.set_coords(coords, self.calibrated)
        if self.comm.size > 1 and self.features_choice == "auto":
            self.features = choose_features_mode(self.comm, self.engine, *sample_batch)
        self.rebalances_left = 2
        log.info("coords %d, shard %s, predicted imbalance %.3f, features %s", coords.total, self.shard,
                 self.predicted_imbalance(), self.features)

    def calibrate(self, coords: Coordinates, sample_batch) -> list[float]:
        """Seconds per query of each parameter: the FLOP model calibrated by a few timings on
        every rank (stoppable), averaged over the ranks so that all agree."""
        if not hasattr(self.engine, "plans"):
            return [1.0] * len(coords.counts)  # full forwards: every query costs the same
        from ..zo.costs import calibrated_costs

        x, y = sample_batch
        check = self.stop.check if self.stop is not None else no_check
        outcome = attempt(lambda: calibrated_costs(self.engine, coords, x, y, check=check))
        settle(self.comm, self.stop, outcome, "cost model, before step 1")
        costs = torch.tensor(outcome.value, dtype=torch.float64)
        self.comm.allreduce_sum_(costs)
        return (costs / self.comm.size).tolist()

    def set_coords(self, coords: Coordinates, costs: list[float]) -> None:
        """New active coordinates (a mask draw) and per-parameter seconds per query (agreed)."""
        self.coords, self.costs = coords, list(costs)
        self.bounds = balanced_bounds(list(coords.counts), self.costs, self.comm.size, self.granule)

    def rebalance(self, compute: list[float]) -> None:
        """Correct the costs with the measured shard times of a step (the same on every rank)."""
        if self.comm.size > 1:
            self.set_coords(self.coords, corrected_costs(self.bounds, list(self.coords.counts), self.costs, compute))

    def state_dict(self) -> dict:
        """The calibrated query costs (measured once per run; rebalancing corrects a copy)."""
        return {"costs": list(self.calibrated)}

    def load_state_dict(self, state: dict) -> None:
        self.calibrated = list(state.get("costs") or [])

    @property
    def shard(self) -> tuple[int, int]:
        return self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]

    def predicted_imbalance(self) -> float:
        loads = shard_costs(self.bounds, list(self.coords.counts), self.costs)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    @property
    def queries_per_step(self) -> int:
        return self.coords.total * (2 if self.difference == "central" else 1)

    def _group_costs(self) -> list[float]:
        """Predicted seconds of each stacked pass of this rank's shard, in order (for progress)."""
        start, stop = self.shard
        out = []
        for pi, flat in self.coords.runs(start, stop):
            per = self.engine.batch_size(pi)
            if self.difference == "central":
                per = max(1, per // 2)
            n = len(flat)
            out += [self.costs[pi] * min(per, n - i) for i in range(0, n, per)]
        return out

    # ---- one step ---------------------------------------------------------------------
    def __call__(self, x: torch.Tensor, y: torch.Tensor, step: int) -> StepResult:
        """One step on the minibatch (x, y), the optimizer's update included."""
        comm, engine = self.comm, self.engine
        times = {}
        t0 = time.perf_counter()
        share_batch(comm, x, y)

        # the unperturbed forward (cached features) and the base loss, on the driver
        base = torch.full((1,), math.nan, dtype=torch.float64)
        error = None
        if comm.is_driver:
            try:
                base[0] = float(engine.prepare(x, y))
            except UserError as exc:
                error = str(exc)
        comm.bcast_(base)
        ok = math.isfinite(float(base[0]))
        if ok and comm.size > 1:  # the same branch on every rank: base is shared
            if self.features == "broadcast":
                feats = engine.feature_tensors() if comm.is_driver else \
                    [torch.empty(s, dtype=dt, device=x.device) for s, dt in engine.feature_shapes(tuple(x.shape), x.dtype)]
                for t in feats:
                    comm.bcast_(t)
                if not comm.is_driver:
                    engine.load_features(feats, y, float(base[0]))
            elif not comm.is_driver:
                try:
                    engine.prepare(x, y)
                except UserError as exc:
                    error = str(exc)
        t1 = time.perf_counter()
        times["forward"] = t1 - t0

        # this rank's shard of the coordinates
        start, stop = self.shard
        dtype = next(self.model.parameters()).dtype
        outcome = Outcome(value=torch.full((stop - start,), math.nan, dtype=dtype), error=error)
        if ok and error is None:
            check = self._check_with_progress(step)
            outcome = attempt(lambda: cge(engine, self.coords, self.mu, self.difference, start, stop,
                                          base=float(base[0]), check=check))
            if outcome.value is None:
                outcome.value = torch.full((stop - start,), math.nan, dtype=dtype)
        local = outcome.value.to(dtype).cpu().contiguous()
        t2 = time.perf_counter()
        times["compute"] = outcome.seconds = t2 - t1

        values = comm.gatherv(local, [self.bounds[r + 1] - self.bounds[r] for r in range(comm.size)])
        times["gather"] = time.perf_counter() - t2
        if not ok and outcome.error is None and comm.is_driver:
            outcome.error = f"loss is {float(base[0])} (not finite)"
        compute = settle(comm, self.stop, outcome, f"step {step + 1}")

        t3 = time.perf_counter()
        finish(comm, self.model, x, lambda: apply_gradient(self.optimizer, self.model, self.coords, values))
        times["update"] = time.perf_counter() - t3
        if self.rebalances_left > 0:
            self.rebalances_left -= 1
            self.rebalance(compute)
        free = engine.free_count(self.coords) * (1 if self.difference == "forward" else 2) if ok else 0
        return StepResult(loss=float(base[0]), queries=self.queries_per_step - free, compute=compute, times=times,
                          free_queries=free)

    def _check_with_progress(self, step: int):
        stop_check = self.stop.check if self.stop is not None else None
        report = self.progress(step) if (self.progress is not None and self.comm.is_driver) else None
        if report is None:
            return stop_check or (lambda: None)
        costs = self._group_costs()
        total = sum(costs) or 1.0
        state = {"i": 0, "done": 0.0}

        def check():
            if stop_check is not None:
                stop_check()
            report(state["i"], len(costs), state["done"] / total)
            if state["i"] < len(costs):
                state["done"] += costs[state["i"]]
            state["i"] += 1

        return check


def choose_features_mode(comm, engine, x: torch.Tensor, y: torch.Tensor) -> str:
    """Pick ``broadcast`` or ``recompute`` by timing both on this job (identical results).

    Recompute costs one cached forward on each worker; broadcast costs moving the cached
    activations. The slower of the two ranks decides, the same on every rank. Both timings
    synchronize the device (:func:`zohpc.timing.timed`).
    """
    if comm.size == 1:
        return "recompute"
    from ..timing import timed

    dev = x.device
    comm.agree(engine.prepare, x, y)  # warm; a task error here is reported on every rank
    t_prepare = comm.allreduce_max(timed(lambda: engine.prepare(x, y), dev)[1])
    feats = [torch.empty(s, dtype=dt, device=dev) for s, dt in engine.feature_shapes(tuple(x.shape), x.dtype)]
    comm.barrier()

    def send():
        for t in feats:
            comm.bcast_(t)

    t_bcast = comm.allreduce_max(timed(send, dev)[1])
    return "broadcast" if t_bcast < t_prepare else "recompute"
