"""Stop requests (SIGTERM, SIGUSR1, SIGINT) answered within seconds, wherever the run is.

A signal only sets a flag. Long loops (query groups, RGE directions, cost calibration)
call :meth:`StopRequest.check` between units of work; it raises :class:`StepAbandoned`
once a stop was requested on this rank or announced by another rank. The step protocol
catches it, joins the step's remaining collectives with placeholder values, and all ranks
then agree (one allreduce) to discard the step, checkpoint the last completed one and
exit 75.
"""

from __future__ import annotations


class StepAbandoned(Exception):
    """Raised by a stop check inside a step or a start-up phase: the work in progress is dropped."""


class Preempted(Exception):
    """All ranks agreed to stop: checkpoint the last completed step (if any) and exit 75."""


def no_check() -> None:
    """The check used where no stop handling is installed (tests, library use)."""
