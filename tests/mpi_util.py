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


def gradient_problem(model_name: str, device: str = "cpu"):
    """A small seeded CGE problem (model, batch, sparse coordinates, engine) shared by the
    single-process reference and the script run under mpiexec, on ``device``."""
    import torch

    from zohpc.masks import layerwise_random_masks, maskable_names
    from zohpc.models import build_model
    from zohpc.zo import Coordinates, QueryEngine

    shape = (1, 8, 8) if model_name == "digits_cnn" else (3, 8, 8)
    torch.manual_seed(0)
    model = build_model(model_name, shape, 10)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(8, *shape, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    names = maskable_names(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    sparsity = 0.5 if model_name == "digits_cnn" else 0.995
    coords = Coordinates(model, layerwise_random_masks(shapes, {n: sparsity for n in names}, 0, 0))
    model, x, y = model.to(device), x.to(device), y.to(device)
    return model, x, y, coords, QueryEngine(model, query_batch=5)
