"""Tasks: the problem being trained (model, data, objective). See :mod:`zohpc.tasks.base`."""

from .base import Task

__all__ = ["Task"]
