"""The process-wide settings of a run, made visibly and in one place.

Nothing in zohpc changes process-wide state on import or in a constructor; a run calls
:func:`setup_runtime` once at start-up, and it logs what it did.

* device: ``cuda:(local rank mod GPUs)`` when CUDA is wanted and present, else the CPU;
* threads: the node's cores divided by the ranks on the node (``ZOHPC_THREADS`` overrides);
* IEEE float32 on CUDA: TF32 off for matmuls and cuDNN convolutions. torch enables TF32
  for cuDNN convolutions by default; its ~1e-3 relative rounding would swamp the loss
  differences of a finite difference at mu = 5e-3;
* on CPU, glibc keeps freed blocks for reuse (:func:`tune_malloc`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .comm import require_device


@dataclass
class Runtime:
    device: torch.device
    threads: int
    tf32: bool
    malloc_tuned: bool

    def describe(self) -> str:
        extra = "TF32 off" if self.device.type == "cuda" else ("malloc tuned" if self.malloc_tuned else "")
        return f"device {self.device}, {self.threads} thread(s)" + (f", {extra}" if extra else "")


_MALLOC_TUNED = False


def tune_malloc() -> bool:
    """Let glibc keep and reuse freed blocks up to 32 MiB instead of mmap/munmap-ing them.

    Query passes allocate and free many activation-sized tensors; with glibc's defaults each
    large one is a fresh mmap whose first touch page-faults, which costs more than the
    arithmetic (measured 2-4 ns per element vs 0.2-0.6). Process-wide, idempotent; a no-op
    where glibc is not the allocator. Never called by the engine: a run's set-up (or a
    benchmark) calls it visibly. Returns whether the setting was applied.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return True
    try:
        import ctypes
        import ctypes.util
        import sys
        if not sys.platform.startswith("linux"):
            return False
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(-3, 32 * 1024 * 1024) == 1  # M_MMAP_THRESHOLD: 32 MiB (the maximum)
        ok = (libc.mallopt(-1, 1024 * 1024 * 1024) == 1) and ok  # M_TRIM_THRESHOLD: 1 GiB
        _MALLOC_TUNED = ok
        return ok
    except (OSError, AttributeError):
        return False


def ieee_float32() -> None:
    """TF32 off everywhere torch could use it (matmul and cuDNN)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def check_runtime(comm, device: str = "auto") -> None:
    """What :func:`setup_runtime` would refuse (a device not present, a bad ZOHPC_THREADS),
    without changing anything: run through Comm.agree before any file is written."""
    comm.threads_per_rank()
    require_device(device, "config key 'train.device'")


def setup_runtime(comm, device: str = "auto", tune_allocator: bool = True) -> Runtime:
    """Bind this rank's device and threads and set numeric modes; identical on every rank."""
    dev = comm.bind_device(device)
    threads = comm.set_threads()
    ieee_float32()
    tuned = tune_malloc() if (tune_allocator and dev.type == "cpu") else False
    return Runtime(device=dev, threads=threads, tf32=False, malloc_tuned=tuned)
