"""The only module that imports mpi4py: ranks, device binding, tensor collectives, aborts.

Collectives take contiguous tensors and use mpi4py's buffer (uppercase) calls: nothing on
the hot path is pickled. CUDA tensors go to MPI as device buffers (``__cuda_array_interface__``)
when the MPI library is CUDA-aware (:func:`cuda_aware_mpi`), and are staged through host
memory otherwise, so any MPI works.
``run_main`` wraps an entry point so that an exception on any rank ends the whole job.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import torch

from .errors import EXIT_USER_ERROR, UserError
from .launch import check_launch

# mpi4py initializes MPI on import; with no mpiexec it starts as a singleton of size 1.
from mpi4py import MPI  # noqa: E402

EXIT_ABORT = 1

_CUDA_AWARE: bool | None = None


def cuda_aware_mpi() -> bool:
    """Whether the MPI library accepts CUDA device buffers (asked once per process).

    ``ZOHPC_CUDA_AWARE_MPI=1`` / ``0`` decides; otherwise the library is asked: Open MPI's
    ``MPIX_Query_cuda_support()``, MPICH's ``MPIX_GPU_query_support(CUDA)``; neither: no.
    Every rank loads the same library, so every rank gets the same answer.
    """
    global _CUDA_AWARE
    env = os.environ.get("ZOHPC_CUDA_AWARE_MPI", "").strip()
    if env:
        if env not in ("0", "1"):
            raise UserError(f"environment variable ZOHPC_CUDA_AWARE_MPI: expected 0 or 1, got {env!r}")
        return env == "1"
    if _CUDA_AWARE is None:
        _CUDA_AWARE = _ask_library()
    return _CUDA_AWARE


def _ask_library() -> bool:
    import ctypes

    try:
        lib = ctypes.CDLL(MPI.__file__)  # symbol lookup covers the MPI library it links
    except OSError:
        return False
    query = getattr(lib, "MPIX_Query_cuda_support", None)  # Open MPI (MPICH answers it too)
    if query is not None:
        query.restype = ctypes.c_int
        if query() == 1:
            return True
    gpu = getattr(lib, "MPIX_GPU_query_support", None)  # MPICH: gpu type 0 is CUDA
    if gpu is not None:
        flag = ctypes.c_int(0)
        return gpu(0, ctypes.byref(flag)) == 0 and flag.value == 1
    return False


def _cores_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def require_device(preference: str, culprit: str) -> None:
    """One line naming ``culprit`` when ``preference`` asks for CUDA on a machine without it."""
    if preference.split(":")[0] == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{culprit}: {preference!r} requested but no CUDA device is available")


class Comm:
    """A communicator with the job's layout: rank, size, node-local rank, device, threads."""

    def __init__(self, mpi_comm=None):
        self.mpi = mpi_comm if mpi_comm is not None else MPI.COMM_WORLD
        self.rank = self.mpi.Get_rank()
        self.size = self.mpi.Get_size()
        node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank = node.Get_rank()
        self.local_size = node.Get_size()
        node.Free()
        # a private duplicate for control messages (stop notices), apart from the collectives
        self.ctl = self.mpi.Dup() if self.size > 1 else None
        self._notices: list = []

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ placement
    def bind_device(self, preference: str = "auto") -> torch.device:
        """``cuda:local_rank % n_gpus`` when CUDA is wanted and present, else the CPU."""
        require_device(preference, "config key 'train.device'")
        if preference in ("auto", "cuda") and torch.cuda.is_available():
            index = self.local_rank % torch.cuda.device_count()
            torch.cuda.set_device(index)
            return torch.device("cuda", index)
        return torch.device("cpu")

    def threads_per_rank(self) -> int:
        """Cores on this node divided by the ranks on this node (at least 1)."""
        env = os.environ.get("ZOHPC_THREADS")
        if env:
            try:
                n = int(env)
            except ValueError:
                n = 0
            if n < 1:
                raise UserError(f"environment variable ZOHPC_THREADS: {env!r} is not a positive integer")
            return n
        return max(1, _cores_available() // self.local_size)

    def set_threads(self) -> int:
        n = self.threads_per_rank()
        torch.set_num_threads(n)
        return n

    def one_process_only(self, why: str) -> None:
        """Collective: started under mpirun, a one-process tool refuses once, exit 2 on every rank."""
        if self.size > 1:
            self.raise_if_any(why)

    # ------------------------------------------------------------------ collectives
    def _buffer(self, tensor: torch.Tensor):
        """``(what MPI reads or writes, host copy or None)`` for a contiguous tensor.

        CPU tensors: their memory. CUDA tensors: the device memory itself under a CUDA-aware
        MPI (after the stream's queued work is done: MPI ignores torch's stream order), else a
        host copy (the caller copies it back into ``tensor`` when MPI wrote to it)."""
        if not tensor.is_contiguous():
            raise ValueError("MPI buffers must be contiguous tensors")
        if tensor.device.type == "cpu":
            return tensor.numpy(), None
        if tensor.device.type == "cuda" and cuda_aware_mpi():
            torch.cuda.current_stream(tensor.device).synchronize()
            return tensor.detach(), None
        host = tensor.cpu()
        return host.numpy(), host

    def _empty_like(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """An output of ``n`` values where MPI can write it: on the device under a CUDA-aware MPI."""
        on_device = local.device.type == "cuda" and cuda_aware_mpi()
        return torch.empty(n, dtype=local.dtype, device=local.device if on_device else "cpu")

    def bcast_(self, tensor: torch.Tensor, root: int = 0) -> torch.Tensor:
        """Broadcast ``tensor`` in place from ``root``."""
        if self.size == 1:
            return tensor
        buf, host = self._buffer(tensor)
        self.mpi.Bcast(buf, root=root)
        if host is not None:
            tensor.copy_(host)
        return tensor

    def gatherv(self, local: torch.Tensor, counts: list[int], root: int = 0) -> torch.Tensor | None:
        """Concatenate every rank's 1-D ``local`` (rank r holds ``counts[r]`` values) on ``root``."""
        if self.size == 1:
            return local.clone()
        buf, _ = self._buffer(local)
        if self.rank == root:
            out = self._empty_like(local, sum(counts))
            displs = [sum(counts[:r]) for r in range(self.size)]
            self.mpi.Gatherv(buf, [self._buffer(out)[0], counts, displs, None], root=root)
            return out.to(local.device)
        self.mpi.Gatherv(buf, None, root=root)
        return None

    def allgatherv(self, local: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's 1-D ``local`` on every rank."""
        if self.size == 1:
            return local.clone()
        buf, _ = self._buffer(local)
        out = self._empty_like(local, sum(counts))
        displs = [sum(counts[:r]) for r in range(self.size)]
        self.mpi.Allgatherv(buf, [self._buffer(out)[0], counts, displs, None])
        return out.to(local.device)

    def allgatherv_or_abandon(self, work, counts: list[int]) -> torch.Tensor:
        """``allgatherv`` of the float64 values ``work()`` returns on each rank (rank r:
        ``counts[r]`` values), where ``work`` may raise StepAbandoned (a stop request).

        One flag per rank travels with the values: if any rank abandoned, every rank raises
        StepAbandoned after the collective; if ``work`` raised a UserError (a task's objective
        failed) on any rank, every rank raises that rank's message. Either way all ranks leave
        at the same point and the next collective matches.
        """
        from .stop import StepAbandoned

        error = None
        try:
            local = work().to(torch.float64).reshape(-1)
            flag = 0.0
        except StepAbandoned:
            local = torch.full((counts[self.rank],), float("nan"), dtype=torch.float64)
            flag = 1.0
        except UserError as exc:
            local = torch.full((counts[self.rank],), float("nan"), dtype=torch.float64)
            flag, error = 2.0, str(exc)
        buf = torch.cat([local.cpu(), torch.tensor([flag], dtype=torch.float64)]).contiguous()
        every = self.allgatherv(buf, [c + 1 for c in counts])
        ends = torch.tensor(counts, dtype=torch.int64).add(1).cumsum(0)
        if bool((every[ends - 1] == 2).any()):
            self.raise_if_any(error)
        if bool((every[ends - 1] > 0).any()):
            raise StepAbandoned()
        keep = torch.ones(every.shape[0], dtype=torch.bool)
        keep[ends - 1] = False
        return every[keep]

    def allreduce_sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return tensor
        buf, host = self._buffer(tensor)
        self.mpi.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
        if host is not None:
            tensor.copy_(host)
        return tensor

    def allreduce_max(self, value: float) -> float:
        buf = torch.tensor([float(value)], dtype=torch.float64)
        if self.size > 1:
            self.mpi.Allreduce(MPI.IN_PLACE, buf.numpy(), op=MPI.MAX)
        return float(buf[0])

    def gather_floats(self, values: list[float], root: int = 0) -> torch.Tensor | None:
        """Gather a fixed-length list of floats from every rank: a (size, len) tensor on root."""
        local = torch.tensor(values, dtype=torch.float64)
        out = self.gatherv(local, [len(values)] * self.size, root)
        return None if out is None else out.view(self.size, len(values))

    def bcast_strings(self, names: list[str] | None, root: int = 0) -> list[str]:
        """Broadcast a list of short strings from ``root`` as bytes (no pickle)."""
        if self.size == 1:
            return list(names)
        data = "\n".join(names).encode() if self.rank == root else b""
        length = torch.tensor([len(data)], dtype=torch.int64)
        self.bcast_(length, root)
        buf = torch.tensor(list(data), dtype=torch.uint8) if self.rank == root \
            else torch.empty(int(length[0]), dtype=torch.uint8)
        if buf.numel():
            self.bcast_(buf, root)
        text = bytes(buf.numpy()).decode()
        return text.split("\n") if text else []

    # ------------------------------------------------------------------ stop notices
    STOP_TAG = 75

    def send_stop_notice(self) -> None:
        """Tell every other rank, without blocking, that this rank was asked to stop."""
        if self.size == 1:
            return
        buf = bytearray(1)
        self._notices += [self.ctl.Isend([buf, MPI.BYTE], dest=r, tag=self.STOP_TAG)
                          for r in range(self.size) if r != self.rank]

    def stop_notice_pending(self) -> bool:
        """Whether another rank has sent a stop notice (a non-blocking probe, ~1 us)."""
        return self.size > 1 and bool(self.ctl.Iprobe(source=MPI.ANY_SOURCE, tag=self.STOP_TAG))

    def drain_stop_notices(self) -> None:
        """Receive pending notices and complete our own sends (before exiting)."""
        if self.size == 1:
            return
        buf = bytearray(1)
        while self.ctl.Iprobe(source=MPI.ANY_SOURCE, tag=self.STOP_TAG):
            self.ctl.Recv([buf, MPI.BYTE], source=MPI.ANY_SOURCE, tag=self.STOP_TAG)
        if self._notices:
            MPI.Request.Waitall(self._notices)
            self._notices = []

    def barrier(self) -> None:
        if self.size > 1:
            self.mpi.Barrier()

    # ------------------------------------------------------------------ errors
    def agree(self, fn, *args, **kwargs):
        """Run ``fn`` on every rank; if it raises a UserError on any rank, raise it on all.

        Used for start-up checks (config, files) so every rank reports the same line and
        exits with code 2 instead of leaving the others waiting in a collective.
        """
        error = None
        result = None
        try:
            result = fn(*args, **kwargs)
        except UserError as exc:
            error = str(exc)
        self.raise_if_any(error)
        return result

    def raise_if_any(self, error: str | None) -> None:
        """Collective: if any rank passes an error message, raise the lowest such rank's
        message as an agreed UserError on every rank (pickle-free; not on the hot path)."""
        failed = torch.tensor([float(self.rank if error is not None else self.size)], dtype=torch.float64)
        if self.size > 1:
            self.mpi.Allreduce(MPI.IN_PLACE, failed.numpy(), op=MPI.MIN)
        first = int(failed[0])
        if first >= self.size:
            return
        message = self.bcast_strings([error] if self.rank == first else None, root=first)
        raise _agreed(UserError(message[0] if message else "error"))

    def abort(self, code: int = EXIT_ABORT) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        if self.size > 1:
            time.sleep(0.5)  # let the launcher forward this rank's message before it kills the job
            self.mpi.Abort(code)
        os._exit(code)


def _agreed(exc: UserError) -> UserError:
    exc.agreed = True  # raised identically on every rank
    return exc


_WORLD: Comm | None = None


def world() -> Comm:
    global _WORLD
    if _WORLD is None:
        _WORLD = Comm()
    return _WORLD


def _say(text: str) -> None:
    """One write per message, so lines from several ranks sharing a pipe do not interleave."""
    sys.stderr.write(text.rstrip("\n") + "\n")
    sys.stderr.flush()


def run_main(fn, prog: str = "zohpc") -> None:
    """Run an entry point and exit with its code (see :func:`run_guarded`)."""
    sys.exit(run_guarded(fn, prog) or 0)


def run_guarded(fn, prog: str = "zohpc"):
    """Call ``fn(comm)`` and return its value; user errors exit 2 on every rank, anything
    else aborts the job.

    A UserError raised on all ranks (see :meth:`Comm.agree`) ends each rank cleanly with
    exit code 2, printed once (by rank 0). A UserError seen by one rank only, or any other
    exception, is printed with the rank and ends the whole job through MPI_Abort, so no
    rank hangs in a collective.
    """
    comm = world()
    try:
        comm.agree(check_launch, comm.size)  # before the entry point touches any file
        return fn(comm)
    except SystemExit:
        raise
    except UserError as exc:
        agreed = comm.size == 1 or getattr(exc, "agreed", False)
        if comm.is_driver or not agreed:  # an agreed error is the same line on every rank: print it once
            _say(f"{prog}: error: {exc}")
        if agreed:
            sys.exit(EXIT_USER_ERROR)
        comm.abort(EXIT_USER_ERROR)
    except BaseException as exc:  # noqa: BLE001 - the job must not hang on any error
        tb = traceback.format_exc()
        _say(f"{prog}: rank {comm.rank}/{comm.size}: fatal {type(exc).__name__}: {exc}\n{tb}")
        comm.abort(EXIT_ABORT if not isinstance(exc, KeyboardInterrupt) else 130)
