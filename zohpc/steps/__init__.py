"""The step protocol: one step object per estimator behind one call,
``step(x, y, step_index, apply_update) -> StepResult`` (see :mod:`zohpc.steps.protocol`)."""

from .cge import CGEStep
from .lizo import LIZOStep
from .protocol import StepResult
from .rge import RGEStep

__all__ = ["CGEStep", "RGEStep", "LIZOStep", "StepResult"]
