"""Contiguous shards of the queries of a step, balanced by predicted cost.

Shard boundaries fall on query-group boundaries (multiples of ``query_batch`` from the
start of each parameter), so every query is evaluated in the same stacked pass whatever
the number of ranks or the costs: the gradient is bit-identical for any layout.
All functions are pure: every rank computes the same layout from the same inputs.
:func:`contiguous_split` is the one even split of zohpc (RGE directions, LIZO queries, test
batches); :func:`balanced_bounds` the cost-balanced one of CGE coordinates.
"""

from __future__ import annotations


def contiguous_split(n: int, parts: int, granule: int = 1) -> list[int]:
    """Bounds ``b[0]=0 <= ... <= b[parts]=n`` of ``parts`` contiguous blocks of ``n`` items.

    Blocks are whole multiples of ``granule`` (but the last piece of ``n``) and their sizes
    differ by at most one granule; the larger blocks come last (``floor(units * r / parts)``).
    """
    if parts < 1 or granule < 1 or n < 0:
        raise ValueError(f"contiguous_split: need n >= 0, parts >= 1, granule >= 1 (got {n}, {parts}, {granule})")
    units = -(-n // granule)
    return [min(n, (units * r // parts) * granule) for r in range(parts + 1)]


def largest_divisor(n: int, cap: int) -> int:
    """The largest divisor of ``n`` that is <= ``cap`` (at least 1): stacked group sizes that
    divide ``query_batch`` tile shards whose bounds fall on multiples of it."""
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


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
