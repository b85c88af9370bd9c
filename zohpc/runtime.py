"""The process-wide settings of a run, made visibly and in one place.

Nothing in zohpc changes process-wide state on import or in a constructor; a run calls
:func:`setup_runtime` once at start-up, and it logs what it did.

* device: ``cuda:(local rank mod GPUs)`` when CUDA is wanted and present, else the CPU;
* threads: the node's cores divided by the ranks on the node (``ZOHPC_THREADS`` overrides);
* IEEE float32 on CUDA: TF32 off for matmuls and cuDNN convolutions. torch enables TF32
  for cuDNN convolutions by default; its ~1e-3 relative rounding would swamp the loss
  differences of a finite difference at mu = 5e-3;
* on CPU, glibc keeps freed blocks for reuse (see :func:`zohpc.zo.engine.tune_malloc`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Runtime:
    device: torch.device
    threads: int
    tf32: bool
    malloc_tuned: bool

    def describe(self) -> str:
        extra = "TF32 off" if self.device.type == "cuda" else ("malloc tuned" if self.malloc_tuned else "")
        return f"device {self.device}, {self.threads} thread(s)" + (f", {extra}" if extra else "")


def ieee_float32() -> None:
    """TF32 off everywhere torch could use it (matmul and cuDNN)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")


def setup_runtime(comm, device: str = "auto", tune_allocator: bool = True) -> Runtime:
    """Bind this rank's device and threads and set numeric modes; identical on every rank."""
    from .zo.engine import tune_malloc

    dev = comm.bind_device(device)
    threads = comm.set_threads()
    ieee_float32()
    tuned = tune_malloc() if (tune_allocator and dev.type == "cpu") else False
    return Runtime(device=dev, threads=threads, tf32=False, malloc_tuned=tuned)
