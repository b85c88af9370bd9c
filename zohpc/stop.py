"""Stop requests (SIGTERM, SIGUSR1, SIGINT) answered within seconds, wherever the run is.

A signal only sets a flag. Long loops (query groups, RGE directions, cost calibration,
evaluation batches) call :meth:`StopRequest.check` between units of work; it raises
:class:`StepAbandoned` once a stop was requested on this rank or announced by another rank
(a rank that sees its own signal first sends every other rank a non-blocking notice, so a
signal delivered to one rank only still stops all of them). The code around the loop
catches it, joins the remaining collectives of the step or phase with placeholder values,
and all ranks then agree (:meth:`StopRequest.agreed`, part of one allreduce) to discard
the step, checkpoint the last completed one and exit 75. Collectives therefore always
match across ranks: nobody leaves a step early.

Both Slurm (signal to every task) and MPICH's mpiexec (it forwards SIGTERM, SIGINT and
SIGUSR1 to every rank) deliver the signal to all ranks.

The signals are caught by a :class:`SignalLatch`. ``python -m zohpc.train`` installs the
process's latch before its heavy imports (torch, MPI), so a signal in the first second of a
process is a stop too, and keeps it until the process ends: the first signal is the one
that counts, and a second one (or one during the exit) changes nothing, so every stop
exits 75.
"""

from __future__ import annotations

import os
import signal
import sys
import time


class StepAbandoned(Exception):
    """Raised by a stop check inside a step or a start-up phase: the work in progress is dropped."""


class Preempted(Exception):
    """All ranks agreed to stop: checkpoint the last completed step (if any) and exit 75."""


def no_check() -> None:
    """The check used where no stop handling is installed (tests, library use)."""


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class SignalLatch:
    """Catches the stop signals and keeps the first one; later ones change nothing."""

    def __init__(self):
        self.signum = None
        self._saved: dict = {}

    def install(self) -> "SignalLatch":
        if not self._saved:
            for sig in STOP_SIGNALS:
                self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        self._saved = {}

    def _on_signal(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum


_PROCESS_LATCH: SignalLatch | None = None


def install_process_latch() -> SignalLatch:
    """The entry point's latch, installed once for the life of the process (see the module
    docstring); idempotent."""
    global _PROCESS_LATCH
    if _PROCESS_LATCH is None:
        _PROCESS_LATCH = SignalLatch().install()
    return _PROCESS_LATCH


class StopRequest:
    """This rank's view of a stop: its own signal, or another rank's notice.

    It reads the process's latch when the entry point installed one; otherwise (``zohpc.run``
    from a script) it installs its own for the run, and keeps it after a stop, so that a
    second signal during the exit cannot change the exit status."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, comm, poll_seconds: float = 0.05):
        self.comm = comm
        self.poll_seconds = poll_seconds
        self._own = _PROCESS_LATCH is None
        self.latch = SignalLatch() if self._own else _PROCESS_LATCH
        self.notified = False
        self._announced = False
        self._last_poll = 0.0
        self.phase = ""  # set by the run: "masks", "cost model", "step", ... (for the test hook)
        self.sub = ""  # a part of the phase with its own hook count: "eval<epoch>" during an evaluation
        self._sub_checks = 0
        self._inject = _injection(comm.rank)
        self._checks = 0

    # ---- installation (the run does this visibly, and undoes it) -------------------
    def install(self) -> "StopRequest":
        if self._own:
            self.latch.install()
        return self

    def uninstall(self) -> None:
        if self._own and self.signum is None:
            self.latch.uninstall()

    @property
    def signum(self):
        return self.latch.signum

    # ---- queries ------------------------------------------------------------------
    @property
    def requested(self) -> bool:
        return self.signum is not None or self.notified

    def enter(self, phase: str) -> None:
        self.phase, self._checks = phase, 0

    def check(self) -> None:
        """Raise StepAbandoned if a stop was requested here or elsewhere (cheap: a flag test,
        and a non-blocking probe for other ranks' notices at most every ``poll_seconds``)."""
        if self._inject is not None and self._inject[0] in (self.phase, self.sub):
            if self._inject[0] == self.sub:
                self._sub_checks += 1
            else:
                self._checks += 1
            if (self._sub_checks if self._inject[0] == self.sub else self._checks) == self._inject[1]:
                sys.stderr.write(f"zohpc: test hook: SIGTERM to rank {self.comm.rank} in {self.phase} "
                                 f"at {time.time():.3f}\n")
                os.kill(os.getpid(), signal.SIGTERM)
        if self.signum is None and not self.notified:
            now = time.perf_counter()
            if now - self._last_poll < self.poll_seconds:
                return
            self._last_poll = now
            if not self.comm.stop_notice_pending():
                return
            self.notified = True
        if self.signum is not None and not self._announced:
            self._announced = True
            self.comm.send_stop_notice()
        raise StepAbandoned()

    def agreed(self, abandoned: bool = False) -> bool:
        """Collective: True on every rank if any rank abandoned work or was asked to stop."""
        flag = 1.0 if (abandoned or self.requested) else 0.0
        return self.comm.allreduce_max(flag) > 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "notice from another rank"


def _injection(rank: int):
    """Test hook ``ZOHPC_TEST_SIGNAL=PHASE:N[:RANK]``: this process sends itself SIGTERM at
    the N-th stop check of PHASE (on rank RANK only, or on every rank), so tests can stop a
    run at an exact place (during pruning, the cost model, inside a step, or in the
    evaluation after epoch E: ``evalE``)."""
    spec = os.environ.get("ZOHPC_TEST_SIGNAL")
    if not spec:
        return None
    parts = spec.split(":")
    if len(parts) == 3 and int(parts[2]) != rank:
        return None
    return parts[0], int(parts[1])
