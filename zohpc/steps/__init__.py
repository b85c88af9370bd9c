"""The step contract: one step object per estimator behind one call,
``step(x, y, step_index) -> StepResult`` with the update inside (see
:mod:`zohpc.steps.protocol`), built from ``zo.estimator`` by :func:`build_step`."""

from .build import build_step, estimator_name
from .cge import CGEStep
from .graybox import GrayBoxStep
from .lizo import LIZOStep
from .protocol import Outcome, Step, StepResult, attempt, settle
from .rge import RGEStep
from .spsa import SPSAStep

__all__ = ["CGEStep", "GrayBoxStep", "RGEStep", "LIZOStep", "SPSAStep", "Step", "StepResult", "Outcome", "attempt", "settle",
           "build_step", "estimator_name"]
