"""One distributed ZO step: shard the queries over ranks, gather values, step on the driver.

Every rank holds an identical replica. Per step (DESIGN.md, "One training step over MPI"):
the driver runs the unperturbed forward and broadcasts the minibatch, the base loss and,
in ``features = "broadcast"`` mode, the cached activations; every rank (driver included)
evaluates its contiguous shard of the active coordinates; ``Gatherv`` brings the finite
differences (values only) to the driver, which steps the optimizer and broadcasts the
flat parameter vector. Shards are balanced by the *measured* cost of each parameter's
downstream plan and recomputed whenever the mask changes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from .zo import Coordinates, QueryEngine, cge
from .zo.costs import measured_costs


def balanced_bounds(counts: list[int], costs: list[float], parts: int, granule: int = 1) -> list[int]:
    """Split the global coordinate order into ``parts`` contiguous runs of equal total cost.

    Coordinate k of parameter p costs ``costs[p]``; returns ``parts + 1`` boundaries.
    Boundaries fall on multiples of ``granule`` from the start of a parameter: with
    ``granule = query_batch`` every query is evaluated in the same stacked group whatever
    the layout, so the gradient is bit-identical for any number of ranks and any measured
    costs (a resumed run re-measures them). Pure and deterministic.
    """
    weights = [max(float(c), 1e-12) for c in costs]
    total = sum(n * w for n, w in zip(counts, weights))
    n_total = sum(counts)
    bounds = [0]
    start, acc = 0, 0.0  # global offset and cumulative cost at the start of parameter p
    p = 0
    for j in range(1, parts):
        target = total * j / parts
        while p < len(counts) and acc + counts[p] * weights[p] < target:
            acc += counts[p] * weights[p]
            start += counts[p]
            p += 1
        if p == len(counts):
            bounds.append(n_total)
            continue
        inside = int(round((target - acc) / weights[p] / granule)) * granule
        bounds.append(max(bounds[-1], min(n_total, start + min(inside, counts[p]))))
    bounds.append(n_total)
    return bounds


def shard_costs(bounds: list[int], counts: list[int], costs: list[float]) -> list[float]:
    """Predicted seconds of each shard (for the imbalance figure)."""
    per_coord = list(zip(counts, costs))
    out = []
    for r in range(len(bounds) - 1):
        lo, hi, acc, start = bounds[r], bounds[r + 1], 0.0, 0
        for n, c in per_coord:
            a, b = max(lo, start), min(hi, start + n)
            if b > a:
                acc += (b - a) * c
            start += n
        out.append(acc)
    return out


def corrected_costs(bounds: list[int], counts: list[int], costs: list[float], actual: list[float]) -> list[float]:
    """Per-parameter costs rescaled by how far each shard's measured time missed its prediction.

    A parameter's cost is multiplied by the coordinate-weighted mean of ``actual / predicted``
    over the shards that hold its coordinates. Pure: every rank computes the same list
    from the same (allgathered) shard times.
    """
    predicted = shard_costs(bounds, counts, costs)
    factor = [a / p if p > 0 and a > 0 else 1.0 for a, p in zip(actual, predicted)]
    out, start = [], 0
    for n, c in zip(counts, costs):
        weight, acc = 0, 0.0
        for r in range(len(bounds) - 1):
            overlap = min(bounds[r + 1], start + n) - max(bounds[r], start)
            if overlap > 0:
                weight += overlap
                acc += overlap * factor[r]
        out.append(c * (acc / weight) if weight else c)
        start += n
    return out


@dataclass
class StepTimes:
    """Seconds spent in each phase of one step on this rank."""

    driver_forward: float = 0.0
    bcast: float = 0.0
    compute: float = 0.0
    gather: float = 0.0
    optimizer: float = 0.0
    param_bcast: float = 0.0
    extra: dict = field(default_factory=dict)


class DistributedCGE:
    """The per-step protocol of sparse CGE over the ranks of ``comm``."""

    def __init__(self, comm, model: torch.nn.Module, engine: QueryEngine, *, mu: float,
                 difference: str = "forward", features: str = "recompute"):
        if features not in ("broadcast", "recompute"):
            raise ValueError(f"features must be 'broadcast' or 'recompute', got {features!r}")
        self.comm = comm
        self.model = model
        self.engine = engine
        self.mu = mu
        self.difference = difference
        self.features = features
        self.coords: Coordinates | None = None
        self.costs: list[float] | None = None
        self.bounds: list[int] = []
        self._feature_shapes: dict = {}
        self.separate_wait = False  # time the wait for the slowest rank apart from the gather

    # ------------------------------------------------------------------ sharding
    def measure_costs(self, coords: Coordinates, x: torch.Tensor, y: torch.Tensor) -> list[float]:
        """Seconds per query of each parameter's plan, the same list on every rank.

        The parameters with active coordinates are dealt round-robin over the ranks, each
        rank times its share while the others time theirs (the load of a real step), and
        an allreduce assembles the list: start-up costs 1/K of a serial measurement.
        """
        active = [pi for pi, n in enumerate(coords.counts) if n > 0]
        mine = active[self.comm.rank::self.comm.size]
        local = torch.tensor(measured_costs(self.engine, coords, x, y, only=mine), dtype=torch.float64)
        self.comm.allreduce_sum_(local)
        return local.tolist()

    def set_coords(self, coords: Coordinates, costs: list[float]) -> None:
        self.coords = coords
        self.costs = list(costs)
        granule = self.engine.query_batch if self.difference == "forward" else max(1, self.engine.query_batch // 2)
        self.bounds = balanced_bounds(list(coords.counts), self.costs, self.comm.size, granule)

    def rebalance(self, compute_seconds: float) -> None:
        """Refine the shard layout with this step's measured shard times (all ranks agree).

        Start-up timing of a few queries per parameter misses cache and memory effects of a
        full shard; one or two corrections from real steps remove most of the imbalance.
        The gradient does not depend on the layout (boundaries stay on query groups).
        """
        if self.comm.size == 1:
            return
        actual = self.comm.allgatherv(torch.tensor([compute_seconds], dtype=torch.float64), [1] * self.comm.size)
        costs = corrected_costs(self.bounds, list(self.coords.counts), self.costs, actual.tolist())
        self.set_coords(self.coords, costs)

    @property
    def shard(self) -> tuple[int, int]:
        return self.bounds[self.comm.rank], self.bounds[self.comm.rank + 1]

    @property
    def shard_counts(self) -> list[int]:
        return [self.bounds[r + 1] - self.bounds[r] for r in range(self.comm.size)]

    def predicted_imbalance(self) -> float:
        loads = shard_costs(self.bounds, list(self.coords.counts), self.costs)
        mean = sum(loads) / len(loads)
        return max(loads) / mean if mean > 0 else 1.0

    @property
    def queries_per_step(self) -> int:
        return self.coords.total * (2 if self.difference == "central" else 1)

    # ------------------------------------------------------------------ one step
    def _share_batch(self, x: torch.Tensor | None, y: torch.Tensor | None, shape, num_y, dtype, device):
        comm = self.comm
        if not comm.is_driver:
            x = torch.empty(shape, dtype=dtype, device=device)
            y = torch.empty(num_y, dtype=torch.int64, device=device)
        comm.bcast_(x)
        comm.bcast_(y)
        return x, y

    def gradient(self, x: torch.Tensor | None, y: torch.Tensor | None, batch_shape, step: int = 0) -> tuple:
        """Evaluate this rank's shard for the minibatch (x, y) held by the driver.

        Returns ``(values, base_loss, times)``: the finite differences of every active
        coordinate on the driver (None elsewhere), the base loss (every rank) and this
        rank's phase timings. ``batch_shape`` is known on all ranks (fixed batch size);
        ``step`` is unused (CGE is deterministic) and kept for the estimators' common call.
        """
        comm, engine = self.comm, self.engine
        times = StepTimes()
        dtype = next(self.model.parameters()).dtype
        device = next(self.model.parameters()).device
        base = torch.zeros(1, dtype=dtype, device=device)

        t0 = time.perf_counter()
        if comm.is_driver:
            base[0] = engine.prepare(x, y)
        t1 = time.perf_counter()
        times.driver_forward = t1 - t0

        if comm.size > 1:
            comm.bcast_(base)
            if self.features == "recompute":
                x, y = self._share_batch(x, y, batch_shape, batch_shape[0], dtype, device)
            else:  # the features include the input batch; the labels follow
                if comm.is_driver:
                    feats = [t.contiguous() for t in engine.feature_tensors()] + [engine.y.contiguous()]
                else:
                    key = tuple(batch_shape)
                    if key not in self._feature_shapes:  # one forward on zeros, once per batch shape
                        self._feature_shapes[key] = engine.feature_shapes(key)
                    feats = [torch.empty(s, dtype=dt, device=device) for s, dt in self._feature_shapes[key]]
                    feats.append(torch.empty(batch_shape[0], dtype=torch.int64, device=device))
                for t in feats:
                    comm.bcast_(t)
                if not comm.is_driver:
                    engine.load_features(feats[:-1], feats[-1], base[0])
            times.bcast = time.perf_counter() - t1
            if self.features == "recompute" and not comm.is_driver:
                t2 = time.perf_counter()
                engine.prepare(x, y)
                times.extra["recompute"] = time.perf_counter() - t2

        t3 = time.perf_counter()
        start, stop = self.shard
        local = cge(engine, self.coords, self.mu, self.difference, start, stop, base=base[0])
        local = local.to(dtype).contiguous()
        t4 = time.perf_counter()
        times.compute = t4 - t3 + times.extra.get("recompute", 0.0)

        if self.separate_wait:  # benchmarks: waiting for the slowest shard is not communication
            comm.barrier()
            times.extra["wait"] = time.perf_counter() - t4
            t4 = time.perf_counter()
        values = comm.gatherv(local, self.shard_counts)
        times.gather = time.perf_counter() - t4
        return values, float(base[0]), times

    def share_parameters(self) -> float:
        """Broadcast the driver's flat parameter vector; returns the seconds it took."""
        if self.comm.size == 1:
            return 0.0
        t0 = time.perf_counter()
        params = list(self.model.parameters())
        flat = parameters_to_vector(params).detach().contiguous()
        self.comm.bcast_(flat)
        if not self.comm.is_driver:
            with torch.no_grad():
                vector_to_parameters(flat, params)
        return time.perf_counter() - t0


def choose_features_mode(comm, engine: QueryEngine, x: torch.Tensor, y: torch.Tensor) -> str:
    """Pick ``broadcast`` or ``recompute`` by timing both on this job (identical results).

    Recompute costs one cached forward on each worker; broadcast costs moving the cached
    activations. The slower of the two ranks decides, the same on every rank.
    """
    if comm.size == 1:
        return "recompute"
    t0 = time.perf_counter()
    engine.prepare(x, y)
    t_prepare = comm.allreduce_max(time.perf_counter() - t0)
    feats = [torch.empty(s, dtype=dt, device=x.device) for s, dt in engine.feature_shapes(tuple(x.shape))]
    comm.barrier()
    t0 = time.perf_counter()
    for t in feats:
        comm.bcast_(t)
    t_bcast = comm.allreduce_max(time.perf_counter() - t0)
    return "broadcast" if t_bcast < t_prepare else "recompute"



class BatchStatsOnly:
    """Context: BatchNorm uses batch statistics and leaves running statistics untouched.

    Loss queries must not move the running statistics (only the driver's one unperturbed
    forward per step does), or a query would change the model it measures.
    """

    def __init__(self, model: torch.nn.Module):
        self.bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def __enter__(self):
        self.saved = [(m.training, m.track_running_stats, m.running_mean, m.running_var) for m in self.bns]
        for m in self.bns:
            m.train()
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
        return self

    def __exit__(self, *exc):
        for m, (training, track, mean, var) in zip(self.bns, self.saved):
            m.train(training)
            m.track_running_stats = track
            m.running_mean = mean
            m.running_var = var


def split_evenly(n: int, parts: int) -> list[int]:
    """Boundaries of ``parts`` contiguous blocks of ``n`` items, sizes differing by at most one."""
    return [(n * r) // parts for r in range(parts + 1)]


class DistributedRGE:
    """Randomized gradient estimation with the q directions sharded over the ranks.

    Directions are Gaussian vectors over the active coordinates, normalized to the unit
    sphere, drawn on every rank from a generator seeded by (seed, step): only loss values
    travel. The estimate is ``g = (d / q) * sum_j (f(θ + μ u_j) - f(θ)) / μ * u_j`` with
    ``d`` the number of active coordinates (the d-scaling makes it unbiased for the
    gradient of the smoothed loss, since E[u uᵀ] = I / d on the unit sphere).
    """

    def __init__(self, comm, model: torch.nn.Module, *, mu: float, queries: int, seed: int):
        self.comm = comm
        self.model = model
        self.mu = mu
        self.q = queries
        self.seed = seed
        self.coords: Coordinates | None = None

    def set_coords(self, coords: Coordinates) -> None:
        self.coords = coords

    @property
    def queries_per_step(self) -> int:
        return self.q

    def directions(self, step: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % (2 ** 63))
        u = torch.randn(self.q, self.coords.total, generator=gen, dtype=torch.float64)
        return u / u.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def gradient(self, x, y, batch_shape, step: int):
        comm, model = self.comm, self.model
        times = StepTimes()
        params = list(model.parameters())
        dtype, device = params[0].dtype, params[0].device
        t0 = time.perf_counter()
        if not comm.is_driver:
            x = torch.empty(batch_shape, dtype=dtype, device=device)
            y = torch.empty(batch_shape[0], dtype=torch.int64, device=device)
        comm.bcast_(x)
        comm.bcast_(y)
        times.bcast = time.perf_counter() - t0

        t1 = time.perf_counter()
        guard = BatchStatsOnly(model)
        with guard:
            base = torch.nn.functional.cross_entropy(model(x), y)
        u = self.directions(step)
        bounds = split_evenly(self.q, comm.size)
        lo, hi = bounds[comm.rank], bounds[comm.rank + 1]
        saved = [p.detach().clone() for p in params]
        losses = torch.empty(hi - lo, dtype=torch.float64)
        for k, j in enumerate(range(lo, hi)):
            for p, d in zip(params, self.coords.scatter(u[j].to(dtype=dtype, device=device))):
                p.add_(d, alpha=self.mu)
            with guard:
                losses[k] = float(torch.nn.functional.cross_entropy(model(x), y))
            for p, s in zip(params, saved):
                p.copy_(s)
        times.compute = time.perf_counter() - t1

        t2 = time.perf_counter()
        all_losses = comm.gatherv(losses, [bounds[r + 1] - bounds[r] for r in range(comm.size)])
        times.gather = time.perf_counter() - t2
        values = None
        if comm.is_driver:
            coeff = (all_losses - float(base)) / self.mu * (self.coords.total / self.q)
            values = (coeff @ u).to(dtype)
        return values, float(base), times
