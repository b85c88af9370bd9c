"""The ZO query engine (single process): coordinates, batched incremental loss queries, CGE, RGE."""

from .coords import Coordinates
from .engine import NondeterministicModelError, QueryEngine, check_deterministic, tune_malloc
from .estimators import cge
from .batchnorm import batch_stats_only
from .rge import active_scatter, contiguous_split, rge_coefficients, rge_combine, rge_losses, sharded_losses
from .stacked import FullForwardEngine, StackedForward

__all__ = ["Coordinates", "QueryEngine", "cge", "check_deterministic", "NondeterministicModelError",
           "tune_malloc",
           "batch_stats_only",
           "active_scatter", "contiguous_split", "rge_coefficients", "rge_combine", "rge_losses", "sharded_losses",
           "FullForwardEngine", "StackedForward"]
