"""What the benchmarks share: printing a result, and the GPT-shaped problem of the SPSA benches.

A result is one flat dict: ``--json`` prints it as one JSON object (what scripts and the
README's figures read), otherwise one aligned ``key value`` line per entry (floats to 6
significant digits). ``memory`` and ``spsa`` build the same seeded model and token batch
from the same options, so their figures describe the same kind of problem.
"""

from __future__ import annotations

import argparse
import json

import torch


def emit(result: dict, as_json: bool, width: int = 24) -> None:
    """Print a benchmark's result: one JSON object, or one ``key value`` line per entry."""
    if as_json:
        print(json.dumps(result), flush=True)
        return
    for k, v in result.items():
        print(f"{k:{width}s} {v:.6g}" if isinstance(v, float) else f"{k:{width}s} {v}")


def add_gpt_options(p: argparse.ArgumentParser, *, layers: int, width: int, heads: int, vocab: int, batch: int,
                    seq: int, queries: int, queries_help: str | None = None) -> None:
    """The GPT model's shape, its token batch and the SPSA directions, with a bench's defaults."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--width", type=int, default=width)
    p.add_argument("--heads", type=int, default=heads)
    p.add_argument("--vocab", type=int, default=vocab)
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--seq", type=int, default=seq)
    p.add_argument("--queries", type=int, default=queries, help=queries_help)


GPT_OPTIONS = ("layers", "width", "heads", "vocab", "batch", "seq", "queries")


def gpt_problem(args):
    """The seeded GPT model and a random (inputs, targets) token batch of the options' shape."""
    from ..models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab=args.vocab, context=max(args.seq, 1), layers=args.layers, heads=args.heads,
                          width=args.width))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
    return model, x, y


__all__ = ["GPT_OPTIONS", "add_gpt_options", "emit", "gpt_problem"]
