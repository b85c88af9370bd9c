"""``python -m zohpc.bench memory --json``: peak memory of one inference forward, one SPSA step
and one backprop Adam step on a GPT-2-small-sized model (124M parameters, batch 8 x 128
tokens, float32, CPU), each measured in a fresh process (peak resident set size).

SPSA (central differences, ``--queries`` directions) should stay within 1.10x of inference
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

KINDS = ("inference", "spsa", "adam")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--width", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--queries", type=int, default=1, help="SPSA directions (central differences: 2 forwards each)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per process (0: torch's default)")
    p.add_argument("--measure", choices=KINDS, help=argparse.SUPPRESS)  # the child process
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _problem(args):
    from ..models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=args.vocab, context=max(args.seq, 1), layers=args.layers, heads=args.heads,
                          width=args.width))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return model, x, y


def measure(args) -> dict:
    """One kind, in this (fresh) process."""
    from ..models.gpt import lm_loss
    from ..optim import SPSA

    import torch._dynamo  # noqa: F401 - every torch.optim optimizer loads it on first use (~50 MB):
    # all three processes load it, so the figures differ only by what each computation allocates

    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, y = _problem(args)
    out = {"params": sum(p.numel() for p in model.parameters()), "baseline_mb": _peak_mb()}
    with torch.no_grad():  # every kind: one warm-up forward (kernels, allocator), as a training loop has
        float(lm_loss(model(x), y))
    if args.measure == "inference":
        with torch.no_grad():
            t0 = time.perf_counter()
            float(lm_loss(model(x), y))
            out["forward_seconds"] = time.perf_counter() - t0
    elif args.measure == "spsa":
        opt = SPSA(model, lr=1e-6, mu=1e-3, queries=args.queries, difference="central")

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
    opts = [f"--{k}={getattr(args, k)}" for k in ("layers", "width", "heads", "vocab", "batch", "seq", "queries",
                                                  "threads")]
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
        "device": "cpu", "threads": args.threads or torch.get_num_threads(), "queries": args.queries,
        "baseline_mb": round(inf["baseline_mb"], 1),
        "inference_peak_mb": round(inf["peak_mb"], 1), "spsa_step_peak_mb": round(spsa["peak_mb"], 1),
        "adam_step_peak_mb": round(adam["peak_mb"], 1),
        "spsa_over_inference": spsa["peak_mb"] / inf["peak_mb"], "adam_over_inference": adam["peak_mb"] / inf["peak_mb"],
        "forward_seconds": inf["forward_seconds"], "spsa_step_seconds": spsa["spsa_step_seconds"],
        "spsa_floor_seconds": spsa["spsa_floor_seconds"],
        "spsa_step_over_floor": spsa["spsa_step_seconds"] / spsa["spsa_floor_seconds"],
        "adam_step_seconds": adam["adam_step_seconds"],
    }
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:24s} {v}")
    return 0
