"""The clock of every measurement zohpc makes (cost calibration, features mode, benchmarks).

Two concerns, one place:

* device work is asynchronous: a CUDA kernel launch returns before the kernel ends, so a
  timing that does not synchronize measures the launch. :func:`sync` waits for the device;
  :func:`timed` brackets a piece of work with it.
* the clock: wall time by default; ``ZOHPC_CLOCK=cpu`` uses this process's CPU time
  (``time.process_time``). On a machine shared with other jobs, wall time of a
  single-threaded rank stretches with the load while its CPU time does not, so calibrations
  and ``bench scaling``'s ``step_cpu_seconds`` stay comparable. CPU time does not see device
  work nor time spent waiting off the CPU: use it for CPU runs only.
"""

from __future__ import annotations

import os
import time

import torch

CLOCKS = ("wall", "cpu")


def clock_name() -> str:
    """``ZOHPC_CLOCK`` (``wall`` or ``cpu``; default wall). A bad value is a one-line error."""
    name = os.environ.get("ZOHPC_CLOCK", "wall").strip().lower() or "wall"
    if name not in CLOCKS:
        from .errors import UserError

        raise UserError(f"environment variable ZOHPC_CLOCK: expected one of {', '.join(CLOCKS)}, got {name!r}")
    return name


def now() -> float:
    """Seconds on the measurement clock (see the module docstring)."""
    return time.process_time() if clock_name() == "cpu" else time.perf_counter()


def sync(device=None) -> None:
    """Wait until ``device``'s queued work is done (a no-op on the CPU)."""
    if device is None:
        return
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, device=None):
    """``(fn(), seconds)``: the device is synchronized before starting and before stopping."""
    sync(device)
    t0 = now()
    out = fn()
    sync(device)
    return out, now() - t0


__all__ = ["CLOCKS", "clock_name", "now", "sync", "timed"]
