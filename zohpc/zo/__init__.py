"""The ZO query layer (single process): coordinates, the per-layer engine and its full-forward
fallback, the objective at the tail of every query, CGE and the RGE core."""

from .batchnorm import batch_stats_only
from .coords import Coordinates
from .costs import calibrated_costs, plan_flops
from .work import plan_work
from .base import EngineBase, QueryEngineProtocol
from .determinism import NondeterministicModelError, check_deterministic
from .engine import QueryEngine
from .estimators import cge
from .objective import Objective, ObjectiveError
from .rge import active_scatter, rge_coefficients, rge_combine, rge_losses, sharded_losses
from .stacked import FullForwardEngine, StackedForward

__all__ = ["Coordinates", "QueryEngine", "cge", "check_deterministic", "NondeterministicModelError",
           "EngineBase", "QueryEngineProtocol",
           "Objective", "ObjectiveError", "calibrated_costs", "plan_flops", "plan_work", "batch_stats_only",
           "active_scatter", "rge_coefficients", "rge_combine", "rge_losses", "sharded_losses",
           "FullForwardEngine", "StackedForward"]
