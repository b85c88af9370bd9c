"""Helpers for tests that spawn ``mpiexec -n K`` (always with a timeout: nothing may hang)."""

import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


def env(**extra) -> dict:
    e = dict(os.environ)
    e.setdefault("OMP_NUM_THREADS", "1")
    e["ZOHPC_THREADS"] = "1"
    e.update({k: str(v) for k, v in extra.items()})
    return e


def run_ranks(k: int, args: list[str], timeout: float = 240, **extra_env) -> subprocess.CompletedProcess:
    cmd = [mpiexec(), "-n", str(k), sys.executable, *args] if k > 1 else [sys.executable, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env(**extra_env))
