"""The ZO query layer (single process): coordinates, the per-layer engine and its full-forward
fallback, the objective at the tail of every query, CGE and the RGE core."""

from .batchnorm import batch_stats_only
from .coords import Coordinates
from .costs import calibrated_costs, plan_flops
from .engine import NondeterministicModelError, QueryEngine, check_deterministic, tune_malloc
from .estimators import cge
from .objective import Objective, ObjectiveError
from .rge import active_scatter, rge_coefficients, rge_combine, rge_losses, sharded_losses
from .stacked import FullForwardEngine, StackedForward

__all__ = ["Coordinates", "QueryEngine", "cge", "check_deterministic", "NondeterministicModelError", "tune_malloc",
           "Objective", "ObjectiveError", "calibrated_costs", "plan_flops", "batch_stats_only",
           "active_scatter", "rge_coefficients", "rge_combine", "rge_losses", "sharded_losses",
           "FullForwardEngine", "StackedForward"]
