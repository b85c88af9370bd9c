"""``python -m zohpc.bench device [--json]``: the GPU checks in one command (at most ~5 minutes
on one GPU), one JSON object.

* ``tests``: the ``cuda``-marked tests (tests/test_devices.py: every estimator and engine on the
  GPU against float64 autograd, bit-identity across rank counts with ranks sharing the GPU,
  resume across devices), their pytest summary line;
* ``peak``: the measured IEEE float32 matmul rate (TF32 off, as runs compute) in TFLOP/s;
* ``engine``: ResNet-20, batch 256, 90% sparsity: coordinates per second of the query engine
  on a sample of the active coordinates of every parameter, and the conv/linear TFLOP/s it
  achieves beside the float32 peak;
* ``step``: one full CGE step of the paper's setting (ResNet-20, CIFAR-shaped batch 256, 90%
  sparsity, one rank), the projected epoch time (50 000 / 256 steps) and the float32 FLOP
  floor of an epoch from the work model (conv/linear FLOPs of every query at the peak);
* ``sharing``: ``bench scaling`` at 1 rank and at 2 ranks sharing the GPU (ResNet-20, batch
  256, 99% sparsity, so that it fits the time) and the speed-up;
* ``precision``: ``python -m zohpc.bench precision --model resnet20 --json`` when that
  benchmark exists (the precision modes; reported as it prints).

Each part runs while the time budget (``--budget``, default 290 s) lasts and says so when it
is skipped. Without a CUDA device it still runs, skips every part and says what it skipped
("device figures not measured").
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import torch


CIFAR_TRAIN = 50_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench device", description=__doc__.splitlines()[0])
    p.add_argument("--budget", type=float, default=290.0, help="seconds for all parts (default 290)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--query-batch", type=int, default=32)
    p.add_argument("--sample", type=int, default=64, help="coordinates per parameter in the throughput sample")
    p.add_argument("--sharing-sparsity", type=float, default=0.99, help="sparsity of the 1- vs 2-rank runs")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a smoke run of this benchmark on the CPU (small --batch; CPU figures, not device ones)")
    p.add_argument("--skip", action="append", default=[], choices=("tests", "peak", "engine", "step", "sharing",
                                                                   "precision"), help="skip a part (repeatable)")
    p.add_argument("--json", action="store_true", help="print one JSON object (the default output anyway)")
    return p


class Budget:
    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds

    def left(self) -> float:
        return self.end - time.perf_counter()


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _sub(cmd: list[str], timeout: float) -> tuple[int, str, str, float]:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=max(1.0, timeout), cwd=_root(), env=env)
        return p.returncode, p.stdout, p.stderr, time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out, f"timed out after {timeout:.0f} s", time.perf_counter() - t0


def _last_json(text: str):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def run_tests(budget: Budget) -> dict:
    tests = os.path.join(_root(), "tests", "test_devices.py")
    if not os.path.exists(tests):
        return {"skipped": "tests/test_devices.py not found (an installed zohpc without its tests)"}
    code, out, err, sec = _sub([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda",
                                tests], min(170.0, budget.left() - 90))
    lines = [ln for ln in (out + "\n" + err).strip().splitlines() if ln.strip()]
    summary = next((ln.strip("= ") for ln in reversed(lines) if re.search(r"\d+ (passed|failed|error)", ln)),
                   lines[-1] if lines else "")
    failed = [ln.split(" ", 1)[1] for ln in lines if ln.startswith("FAILED ")]
    return {"exit_code": code, "summary": summary, "failed": failed, "seconds": round(sec, 1)}


def float32_peak(dev, n: int = 8192, repeats: int = 5) -> float:
    """TFLOP/s of an ``n x n`` float32 matmul, TF32 off (the runs' IEEE float32), best of ``repeats``."""
    from ..runtime import ieee_float32
    from ..timing import timed

    ieee_float32()
    a = torch.randn(n, n, device=dev)
    b = torch.randn(n, n, device=dev)
    timed(lambda: a @ b, dev)  # warm-up (cuBLAS handles, clocks)
    best = min(timed(lambda: a @ b, dev)[1] for _ in range(repeats))
    return 2 * n ** 3 / best / 1e12


def _paper_problem(dev, batch: int, sparsity: float, query_batch: int):
    from ..masks import layerwise_random_masks, maskable_names
    from ..models import build_model
    from ..zo import Coordinates, QueryEngine

    torch.manual_seed(0)
    model = build_model("resnet20", (3, 32, 32), 10).to(dev)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 32, 32, generator=gen).to(dev)
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    names = maskable_names(model)
    shapes = {n: p.shape for n, p in model.named_parameters() if n in names}
    coords = Coordinates(model, layerwise_random_masks(shapes, {n: sparsity for n in names}, 0, 0))
    return model, x, y, coords, QueryEngine(model, query_batch=query_batch)


def engine_throughput(dev, args, peak: float) -> dict:
    """Coordinates/s and achieved TFLOP/s on up to ``--sample`` active coordinates of every parameter."""
    from ..zo import Coordinates, cge
    from ..timing import timed

    model, x, y, coords, engine = _paper_problem(dev, args.batch, args.sparsity, args.query_batch)
    masks = {}
    for pi, (name, p) in enumerate(model.named_parameters()):
        idx = coords.indices(pi)
        keep = idx[torch.linspace(0, idx.numel() - 1, min(args.sample, idx.numel())).round().long()] \
            if idx.numel() else idx
        m = torch.zeros(p.numel(), dtype=torch.bool)
        m[keep] = True
        masks[name] = m.view(p.shape)
    sample = Coordinates(model, masks)
    engine.prepare(x, y)
    cge(engine, sample, 5e-3, start=0, stop=min(sample.total, 4 * args.query_batch))  # warm-up
    engine.flops = 0
    _, sec = timed(lambda: cge(engine, sample, 5e-3), dev)
    tflops = engine.flops / sec / 1e12
    return {"model": "resnet20", "batch": args.batch, "sparsity": args.sparsity, "query_batch": args.query_batch,
            "sampled_coords": sample.total, "seconds": sec, "coords_per_s": sample.total / sec,
            "tflops": tflops, "fraction_of_float32_peak": tflops / peak if peak else None}


def full_step(dev, args, peak: float, budget: Budget, rate: float | None) -> dict:
    """One CGE step (the training step object, one rank) on every active coordinate of the paper's setting."""
    from ..comm import world
    from ..steps import CGEStep
    from ..timing import timed
    from ..zo.costs import calibrated_costs, plan_flops

    model, x, y, coords, engine = _paper_problem(dev, args.batch, args.sparsity, args.query_batch)
    engine.prepare(x, y)
    per_query = [p.flops for p in engine.work()]
    floor_flops = sum(f * n for f, n in zip(per_query, coords.counts))
    steps = CIFAR_TRAIN // args.batch
    out = {"active_coords": coords.total, "steps_per_epoch": steps,
           "float32_floor_epoch_seconds": floor_flops * steps / (peak * 1e12) if peak else None,
           "work_model_flop_equivalents_per_step": sum(f * n for f, n in zip(plan_flops(engine), coords.counts))}
    if rate and coords.total / rate > budget.left() - 60:
        out["skipped"] = (f"the projected step ({coords.total / rate:.0f} s at {rate:.0f} coords/s) does not fit "
                          f"the budget left; projected from the throughput sample instead")
        out["projected_step_seconds"] = coords.total / rate
        out["projected_epoch_seconds"] = steps * coords.total / rate
        return out
    comm = world()
    step = CGEStep(comm, model, engine, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), mu=5e-3)
    step.set_coords(coords, calibrated_costs(engine, coords, x, y))
    _, sec = timed(lambda: step(x.clone(), y.clone(), 0), dev)
    out.update({"step_seconds": sec, "projected_epoch_seconds": steps * sec,
                "coords_per_s": coords.total / sec})
    return out


def sharing(budget: Budget, args) -> dict:
    """``bench scaling`` at 1 rank, then 2 ranks on the same GPU."""
    import shutil

    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    mpiexec = mpiexec if os.path.exists(mpiexec) else shutil.which("mpiexec")
    cmd = ["-m", "zohpc.bench", "scaling", "--model", "resnet20", "--batch", str(args.batch), "--sparsity",
           str(args.sharing_sparsity), "--steps", "1", "--json"]
    out = {"model": "resnet20", "batch": args.batch, "sparsity": args.sharing_sparsity}
    for k in (1, 2):
        if budget.left() < 45:
            out[f"ranks_{k}"] = {"skipped": "time budget spent"}
            continue
        if k > 1 and not mpiexec:
            out[f"ranks_{k}"] = {"skipped": "no mpiexec"}
            continue
        full = [sys.executable, *cmd] if k == 1 else [mpiexec, "-n", str(k), sys.executable, *cmd]
        code, o, e, sec = _sub(full, budget.left() - 20)
        got = _last_json(o)
        out[f"ranks_{k}"] = {"step_seconds": got["step_seconds"], "imbalance": got["imbalance"],
                             "features": got["features"]} if (code == 0 and got) else \
            {"error": (e.strip().splitlines() or [f"exit {code}"])[-1]}
    s1, s2 = out.get("ranks_1", {}).get("step_seconds"), out.get("ranks_2", {}).get("step_seconds")
    if s1 and s2:
        out["speedup_2_ranks"] = s1 / s2
    return out


def precision(budget: Budget) -> dict:
    if importlib.util.find_spec("zohpc.bench.precision") is None:
        return {"skipped": "zohpc.bench.precision not in this checkout"}
    code, o, e, sec = _sub([sys.executable, "-m", "zohpc.bench", "precision", "--model", "resnet20", "--json"],
                           budget.left() - 5)
    got = _last_json(o)
    return got if (code == 0 and got) else {"error": (e.strip().splitlines() or [f"exit {code}"])[-1]}


def run(comm, args) -> int:
    comm.one_process_only("bench device runs as one process (it starts its own 2-rank run): start it without mpirun")
    parts = ("tests", "peak", "engine", "step", "sharing", "precision")
    result = {"bench": "device", "cuda": torch.cuda.is_available()}
    if args.device == "cuda" and not torch.cuda.is_available():
        result.update({"device": "cpu", "note": "device figures not measured: no CUDA device on this machine",
                       "skipped": {p: "no CUDA device" for p in parts}})
        print(json.dumps(result))
        return 0
    from ..runtime import ieee_float32

    ieee_float32()
    if args.device == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
        result["device"] = torch.cuda.get_device_name(dev)
    else:
        dev = torch.device("cpu")
        result.update({"device": "cpu", "note": "CPU smoke run of the benchmark: CPU figures, not device ones"})
    budget = Budget(args.budget)
    skipped = {p: "--skip" for p in args.skip}
    if "tests" not in args.skip:  # first, in a clean process, before this one holds GPU memory
        result["tests"] = run_tests(budget)
    peak = None
    if "peak" not in args.skip:
        peak = float32_peak(dev, 8192 if dev.type == "cuda" else 1024)
        result["peak"] = {"float32_tflops": peak, "tf32": False}
    rate = None
    if "engine" not in args.skip and budget.left() > 60:
        result["engine"] = engine_throughput(dev, args, peak or 0.0)
        rate = result["engine"]["coords_per_s"]
    elif "engine" not in args.skip:
        skipped["engine"] = "time budget spent"
    if "step" not in args.skip and budget.left() > 45:
        result["step"] = full_step(dev, args, peak or 0.0, budget, rate)
    elif "step" not in args.skip:
        skipped["step"] = "time budget spent"
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    if "sharing" not in args.skip:
        result["sharing"] = sharing(budget, args)
    if "precision" not in args.skip:
        result["precision"] = precision(budget) if budget.left() > 30 else {"skipped": "time budget spent"}
    if skipped:
        result["skipped"] = skipped
    result["seconds"] = round(args.budget - budget.left(), 1)
    print(json.dumps(result))
    return 0


__all__ = ["build_parser", "run", "float32_peak"]
