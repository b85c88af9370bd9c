"""``python -m zohpc.bench memory --json``: peak memory of one inference forward, one SPSA step
and one backprop Adam step on a GPT-2-small-sized model (124M parameters, batch 8 x 128
tokens, float32, CPU), each measured in a fresh process (peak resident set size).

SPSA (``--difference`` central by default, ``--queries`` directions) should stay within 1.10x of inference
(the perturbed weights exist only while a layer reads them); Adam needs parameters,
gradients, two moments and the autograd activations. ``spsa_floor_seconds`` times the
forwards an SPSA step needs, alone: ``spsa_step_seconds`` over it is the cost of
regenerating the noise and updating. Every process loads the same libraries (including
``torch._dynamo``, which any ``torch.optim`` optimizer imports on first use) and runs one
warm-up forward first.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from .report import GPT_OPTIONS, add_gpt_options, emit, gpt_problem

KINDS = ("inference", "spsa", "adam")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench memory", description=__doc__.split("\n\n")[0])
    add_gpt_options(p, layers=12, width=768, heads=12, vocab=50257, batch=8, seq=128, queries=1,
                    queries_help="SPSA directions (central differences: 2 forwards each)")
    p.add_argument("--difference", choices=("central", "forward"), default="central",
                   help="SPSA's differences: central (MeZO; 2 perturbed forwards per direction) or forward "
                        "(the base forward draws no noise)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--measure", choices=KINDS, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def measure(args) -> dict:
    """One kind, in this (fresh) process."""
    from ..models.gpt import lm_loss
    from ..optim import SPSA

    import torch._dynamo  # noqa: F401 - every torch.optim optimizer loads it on first use (~50 MB):
    # all three processes load it, so the figures differ only by what each computation allocates

    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y = gpt_problem(args)
    out = {"params": sum(p.numel() for p in model.parameters()), "baseline_mb": _peak_mb()}
    with torch.no_grad():  # every kind: one warm-up forward (kernels, allocator), as a training loop has
        float(lm_loss(model(x), y))
    if args.measure == "inference":
        with torch.no_grad():
            t0 = time.perf_counter()
            float(lm_loss(model(x), y))
            out["forward_seconds"] = time.perf_counter() - t0
    elif args.measure == "spsa":
        opt = SPSA(model, lr=1e-6, mu=1e-3, queries=args.queries, difference=args.difference)

        @torch.no_grad()
        def closure():
            return lm_loss(model(x), y)

        t0 = time.perf_counter()
        for _ in range(len(opt.tasks())):
            float(closure())
        out["spsa_floor_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        opt.step(closure)
        out["spsa_step_seconds"] = time.perf_counter() - t0
    else:
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        t0 = time.perf_counter()
        lm_loss(model(x), y).backward()
        opt.step()
        out["adam_step_seconds"] = time.perf_counter() - t0
    out["peak_mb"] = _peak_mb()
    return out


def run(comm, args) -> int:
    if args.measure:
        print(json.dumps(measure(args)))
        return 0
    if not comm.is_driver:
        return 0
    opts = [f"--{k}={getattr(args, k)}" for k in GPT_OPTIONS + ("threads", "difference")]
    got = {}
    for kind in KINDS:  # each in a fresh process: peak RSS never carries over
        p = subprocess.run([sys.executable, "-m", "zohpc.bench", "memory", "--measure", kind, *opts],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"bench memory: the {kind} process failed: {p.stderr.strip()[-2000:]}")
        got[kind] = json.loads(p.stdout.strip().splitlines()[-1])
    inf, spsa, adam = got["inference"], got["spsa"], got["adam"]
    result = {
        "bench": "memory", "params": inf["params"], "batch": args.batch, "seq": args.seq, "dtype": "float32",
        "device": "cpu", "threads": args.threads or torch.get_num_threads(), "queries": args.queries, "difference": args.difference,
        "baseline_mb": round(inf["baseline_mb"], 1),
        "inference_peak_mb": round(inf["peak_mb"], 1), "spsa_step_peak_mb": round(spsa["peak_mb"], 1),
        "adam_step_peak_mb": round(adam["peak_mb"], 1),
        "spsa_over_inference": spsa["peak_mb"] / inf["peak_mb"], "adam_over_inference": adam["peak_mb"] / inf["peak_mb"],
        "forward_seconds": inf["forward_seconds"], "spsa_step_seconds": spsa["spsa_step_seconds"],
        "spsa_floor_seconds": spsa["spsa_floor_seconds"],
        "spsa_step_over_floor": spsa["spsa_step_seconds"] / spsa["spsa_floor_seconds"],
        "adam_step_seconds": adam["adam_step_seconds"],
    }
    emit(result, args.json)
    return 0
