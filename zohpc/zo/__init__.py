"""The ZO query engine (single process): coordinates, batched incremental loss queries, CGE, RGE."""

from .coords import Coordinates
from .costs import calibrated_costs, plan_flops
from .engine import NondeterministicModelError, QueryEngine, check_deterministic, tune_malloc
from .estimators import cge, rge
from .objective import Objective, ObjectiveError

__all__ = ["Coordinates", "QueryEngine", "cge", "rge", "check_deterministic", "NondeterministicModelError",
           "tune_malloc"]
__all__ += ["Objective", "ObjectiveError", "calibrated_costs", "plan_flops"]
