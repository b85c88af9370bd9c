"""``python -m zohpc.bench spsa --json``: the SPSA step over MPI, 2 ranks against 1.

Runs ``mpiexec -n 1`` and ``mpiexec -n 2`` of the same SPSA training (a GPT-shaped model on
random tokens, central differences, ``--queries`` directions: with 2, one per rank on 2
ranks), one thread per rank, and reports steps per second of each, their ratio, and
whether the parameters after ``--steps`` steps are identical bit for bit (SHA-256 of the
parameter bytes): only loss values travel, every rank applies the same update.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

from .report import GPT_OPTIONS, add_gpt_options, emit, gpt_problem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench spsa", description=__doc__.split("\n\n")[0])
    add_gpt_options(p, layers=2, width=256, heads=4, vocab=8192, batch=8, seq=128, queries=2)
    p.add_argument("--steps", type=int, default=5, help="steps (the first is a warm-up, not timed)")
    p.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)  # one run under mpiexec
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def params_digest(params) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def worker(comm, args) -> dict:
    from ..models.gpt import lm_loss
    from ..optim import SPSA
    from ..steps.spsa import SPSAStep
    from ..zo.objective import Objective

    torch.set_num_threads(1)
    model, x, y = gpt_problem(args)
    opt = SPSA(model, lr=1e-4, mu=1e-3, queries=args.queries, difference="central", comm=comm)
    step = SPSAStep(comm, model, opt, Objective(loss=lm_loss, name="lm"), check_every=1)
    times = []
    for i in range(args.steps):
        comm.barrier()
        t0 = time.perf_counter()
        step(x, y, i)
        times.append(comm.allreduce_max(time.perf_counter() - t0))
    timed = times[1:] or times
    return {"ranks": comm.size, "seconds_per_step": sum(timed) / len(timed), "digest": params_digest(opt.params),
            "params": sum(p.numel() for p in model.parameters())}


def _mpiexec() -> str:
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


def run(comm, args) -> int:
    if args.worker:
        out = worker(comm, args)
        if comm.is_driver:
            with open(args.worker, "w") as fh:
                json.dump(out, fh)
        return 0
    if not comm.is_driver:
        return 0
    opts = [f"--{k}={getattr(args, k)}" for k in GPT_OPTIONS + ("steps",)]
    env = dict(os.environ, OMP_NUM_THREADS="1", ZOHPC_THREADS="1")
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2):
            path = os.path.join(tmp, f"n{k}.json")
            p = subprocess.run([_mpiexec(), "-n", str(k), sys.executable, "-m", "zohpc.bench", "spsa", "--worker", path,
                                *opts], capture_output=True, text=True, env=env)
            if p.returncode != 0:
                raise RuntimeError(f"bench spsa: the {k}-rank run failed: {(p.stdout + p.stderr).strip()[-2000:]}")
            with open(path) as fh:
                runs[k] = json.load(fh)
    one, two = runs[1], runs[2]
    result = {"bench": "spsa", "params": one["params"], "queries": args.queries, "steps": args.steps,
              "batch": args.batch, "seq": args.seq, "threads_per_rank": 1,
              "seconds_per_step_1rank": one["seconds_per_step"], "seconds_per_step_2ranks": two["seconds_per_step"],
              "speedup_2ranks": one["seconds_per_step"] / two["seconds_per_step"],
              "params_identical": one["digest"] == two["digest"]}
    emit(result, args.json)
    return 0
