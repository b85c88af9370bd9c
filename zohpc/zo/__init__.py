"""The ZO query engine (single process): coordinates, batched incremental loss queries, CGE, RGE."""

from .coords import Coordinates
from .engine import NondeterministicModelError, QueryEngine, check_deterministic, tune_malloc
from .estimators import cge, rge

__all__ = ["Coordinates", "QueryEngine", "cge", "rge", "check_deterministic", "NondeterministicModelError",
           "tune_malloc"]
