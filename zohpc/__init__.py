"""zohpc: zeroth-order training of deep networks over MPI.

``zohpc.run(task, ...)`` trains a :class:`zohpc.Task` from a script (see :mod:`zohpc.api`).
Both are loaded on first use: importing zohpc starts neither torch nor MPI.
"""

from ._version import __version__  # noqa: F401


def __getattr__(name):
    if name == "run":
        from .api import run

        return run
    if name == "Task":
        from .tasks import Task

        return Task
    raise AttributeError(f"module 'zohpc' has no attribute {name!r}")
