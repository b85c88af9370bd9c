"""The query-engine interface every CGE engine implements, and its shared coordinate loop.

:class:`QueryEngineProtocol` is what estimators, steps and the cost model use.
:class:`EngineBase` implements the coordinate side once: positions [start, stop) are cut
into stacked passes per parameter (group sizes divide ``query_batch``, so a shard starting
on a multiple of ``query_batch`` within a parameter is stacked like the whole range and
gradients are bit-identical for any rank count), ``losses`` and ``central_losses``, and
the free coordinates: those an engine can show leave the loss exactly unchanged (an
embedding row whose token is absent from the minibatch) get the base loss without a query
and are counted in ``free_queries``. Subclasses provide ``query`` and ``batch_size``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..sharding import largest_divisor
from ..stop import no_check


@runtime_checkable
class QueryEngineProtocol(Protocol):
    query_batch: int
    param_names: list
    base: torch.Tensor | None
    check: object
    free_queries: int

    def prepare(self, x, y) -> torch.Tensor: ...
    def batch_size(self, param_index: int) -> int: ...
    def losses(self, coords, start: int = 0, stop: int | None = None, mu: float = 5e-3,
               sign: int = 1) -> torch.Tensor: ...
    def central_losses(self, coords, start: int, stop: int, mu: float) -> tuple: ...
    def feature_tensors(self): ...


class EngineBase:
    """Coordinate grouping, ``losses`` and ``central_losses`` over an engine's ``query``."""

    query_batch: int
    param_names: list
    base = None
    check = staticmethod(no_check)
    free_queries = 0  # coordinates answered without a query (exact), since construction
    shares_features = False  # True: feature_tensors/feature_shapes/load_features can replace prepare on workers

    def query(self, param_index: int, flat, steps) -> torch.Tensor:
        raise NotImplementedError

    def batch_size(self, param_index: int) -> int:
        raise NotImplementedError

    def need_prepared(self) -> None:
        if self.base is None:
            raise RuntimeError(f"{type(self).__name__}: call prepare(x, y) first")

    def free_mask(self, param_index: int, flat: list):
        """Which of these coordinates provably leave the loss unchanged (None: none known)."""
        return None

    def check_coords(self, coords) -> None:
        if list(coords.param_names) != list(self.param_names):
            raise ValueError("coordinates were built for a different model")

    def groups(self, coords, start, stop, per_pass):
        """The stacked passes of positions [start, stop): (param index, flat indices) groups."""
        for pi, flat in coords.runs(start, stop):
            flat = flat.tolist()
            size = per_pass(pi)
            for i in range(0, len(flat), size):
                yield pi, flat[i:i + size]

    def central_size(self, param_index: int) -> int:
        """Coordinates per pass of central differences (both signs stacked).

        A divisor of ``query_batch // 2``, the granule of central shards (zohpc.steps.cge), so
        groups tile every shard alike.
        """
        return largest_divisor(max(1, self.query_batch // 2), max(1, self.batch_size(param_index) // 2))

    def free_count(self, coords) -> int:
        """Active coordinates of ``coords`` that :meth:`free_mask` answers without a query."""
        total = 0
        for pi, n in enumerate(coords.counts):
            if n:
                free = self.free_mask(pi, coords.indices(pi).tolist())
                total += sum(free) if free is not None else 0
        return total

    def _group_losses(self, pi, flat, steps):
        free = self.free_mask(pi, flat)
        if free is None or not any(free):
            return self.query(pi, flat, steps)
        out = self.base.expand(len(flat)).clone()
        keep = [i for i, f in enumerate(free) if not f]
        self.free_queries += len(flat) - len(keep)
        if keep:
            out[keep] = self.query(pi, [flat[i] for i in keep], [steps[i] for i in keep])
        return out

    @torch.no_grad()
    def losses(self, coords, start: int = 0, stop: int | None = None, mu: float = 5e-3, sign: int = 1):
        """f(theta + sign*mu*e_k) for global coordinate positions k in [start, stop)."""
        self.check_coords(coords)
        self.need_prepared()
        stop = coords.total if stop is None else stop
        out = self.base.new_empty(stop - start)
        pos = 0
        for pi, chunk in self.groups(coords, start, stop, self.batch_size):
            self.check()
            out[pos:pos + len(chunk)] = self._group_losses(pi, chunk, [sign * mu] * len(chunk))
            pos += len(chunk)
        return out

    @torch.no_grad()
    def central_losses(self, coords, start: int, stop: int, mu: float):
        """(f(theta + mu e_k), f(theta - mu e_k)) with both signs stacked in the same passes."""
        self.check_coords(coords)
        self.need_prepared()
        plus = self.base.new_empty(stop - start)
        minus = self.base.new_empty(stop - start)
        pos = 0
        for pi, chunk in self.groups(coords, start, stop, self.central_size):
            self.check()
            k = len(chunk)
            v = self._group_losses(pi, chunk + chunk, [mu] * k + [-mu] * k)
            plus[pos:pos + k], minus[pos:pos + k] = v[:k], v[k:]
            pos += k
        return plus, minus


__all__ = ["EngineBase", "QueryEngineProtocol"]
