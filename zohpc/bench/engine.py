"""``python -m zohpc.bench engine``: loss queries three ways on the same coordinates.

* naive: one full forward pass per query (parameter entry perturbed in place, restored).
* block reuse: DeepZero's feature reuse: the model is cut into blocks (the children of the
  model, with nn.Sequential containers expanded, so a ResNet BasicBlock or a single CNN layer
  is one block); a query re-runs the block that owns the perturbed parameter and everything
  after it, from the cached input of that block. One query per pass, as in DeepZero's code.
* engine: zohpc.zo.QueryEngine (per-layer downstream plan, incremental perturbed layer,
  one-channel deltas, ``query_batch`` stacked copies).

All three use BatchNorm batch statistics and leave running statistics alone, and run in one
process with the same allocator setting (the engine's tune_malloc is process-wide, so the
baselines profit from it too). --baseline-channels-last also gives the baselines the NHWC
memory order the engine uses. The coordinate
set is a seeded uniform sample over all parameter entries (what a random mask of that density
selects), so layers are represented in proportion to their size. Times include the one
unperturbed forward that block reuse and the engine need per minibatch.

engine_gflops counts the conv/linear FLOPs (2 x multiply-adds) that the engine actually
executes for the queries (one-channel delta convs, full convs downstream, the final linear);
elementwise, BatchNorm and pooling work is not counted. naive_gflops counts the same kind of
FLOPs for the full forward passes of the naive method.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..models import MODEL_NAMES, build_model
from ..zo import Coordinates, QueryEngine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits_cnn", choices=MODEL_NAMES)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--coords", type=int, default=200, help="number of coordinates queried")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--input", default=None, help="CxHxW (default 1x8x8 for digits_cnn, else 3x32x32)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--query-batch", type=int, default=None, help="engine query batch (default: engine default)")
    p.add_argument("--mu", type=float, default=5e-3)
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-naive", action="store_true", help="skip the (slow) naive method")
    p.add_argument("--repeats", type=int, default=1,
                   help="time engine and block reuse this many times, interleaved, and keep the fastest")
    p.add_argument("--baseline-channels-last", action="store_true",
                   help="run naive and block reuse in NHWC memory order too (default: PyTorch's NCHW, as DeepZero)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _parse_shape(text: str):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ConfigError(f"option --input: {text!r} is not CxHxW")
    return shape


def _sample_masks(model, n, gen):
    """Masks selecting ``n`` entries uniformly at random over all parameter entries."""
    named = list(model.named_parameters())
    total = sum(p.numel() for _, p in named)
    pick = torch.randperm(total, generator=gen)[:n].sort().values
    masks, off = {}, 0
    for name, p in named:
        m = torch.zeros(p.numel(), dtype=torch.bool)
        sel = pick[(pick >= off) & (pick < off + p.numel())] - off
        m[sel] = True
        masks[name] = m.view(p.shape)
        off += p.numel()
    return masks


def _batch_stats_copy(model):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.track_running_stats = False  # train mode: batch statistics, nothing updated
    return m.train()


def _blocks(model):
    """(path, module) blocks in forward order: children with nn.Sequential expanded."""
    out = []

    def walk(prefix, mod):
        for name, child in mod.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, nn.Sequential):
                walk(path + ".", child)
            else:
                out.append((path, child))

    walk("", model)
    return out


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@torch.no_grad()
def _naive(model, coords, x, y, mu, channels_last=False):
    m = _batch_stats_copy(model)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    params = list(m.parameters())
    out = []
    for pi, flat in coords.runs():
        flat_view = params[pi].view(-1)
        for f in flat.tolist():
            old = flat_view[f].clone()
            flat_view[f] += mu
            out.append(F.cross_entropy(m(x), y))
            flat_view[f] = old
    return torch.stack(out)


@torch.no_grad()
def _block_reuse(model, coords, x, y, mu, channels_last=False):
    m = _batch_stats_copy(model)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    blocks = _blocks(m)
    mods = [b for _, b in blocks]
    # cached input of every block (the one unperturbed forward)
    inputs, h = [], x
    for b in mods:
        inputs.append(h)
        h = b(h)
    owner = {}
    for bi, (path, b) in enumerate(blocks):
        for name, _ in b.named_parameters():
            owner[f"{path}.{name}"] = bi
    params = dict(m.named_parameters())
    out = []
    for pi, flat in coords.runs():
        name = coords.param_names[pi]
        bi = owner[name]
        flat_view = params[name].view(-1)
        for f in flat.tolist():
            old = flat_view[f].clone()
            flat_view[f] += mu
            h = inputs[bi]
            for b in mods[bi:]:
                h = b(h)
            out.append(F.cross_entropy(h, y))
            flat_view[f] = old
    return torch.stack(out)


def _forward_flops(engine):
    total = 0
    for n in engine.nodes:
        k = engine.kind[n]
        if k in ("conv", "linear"):
            w = engine.modules[n.target].weight
            out = engine.env[n]
            per_out = w.numel() // w.shape[0]
            total += 2 * out.numel() * per_out
    return total


def _matmul_gflops(dtype, seconds=0.3):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 512
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        return 2 * n ** 3 * reps / (time.perf_counter() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


def run(comm, args) -> dict:
    if args.threads < 1 or args.batch < 1 or args.coords < 1:
        raise ConfigError("options --threads, --batch, --coords must be >= 1")
    torch.set_num_threads(args.threads)
    shape = _parse_shape(args.input) if args.input else ((1, 8, 8) if args.model == "digits_cnn" else (3, 32, 32))
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = build_model(args.model, shape, args.classes).to(device=dev, dtype=dtype).train()
    gen = torch.Generator().manual_seed(args.seed + 1)
    x = torch.randn(args.batch, *shape, generator=gen, dtype=dtype).to(dev)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(dev)
    n = min(args.coords, sum(p.numel() for p in model.parameters()))
    coords = Coordinates(model, _sample_masks(model, n, gen))
    kw = {} if args.query_batch is None else {"query_batch": args.query_batch}
    engine = QueryEngine(model, **kw)
    mu = args.mu

    # warm-up (allocator, oneDNN primitive caches) on a few coordinates, then timed runs
    engine.prepare(x, y)
    engine.losses(coords, 0, min(coords.total, 2 * engine.query_batch), mu)
    t_engine = t_block = math.inf
    for _ in range(max(1, args.repeats)):
        _sync(dev)
        t0 = time.perf_counter()
        engine.prepare(x, y)
        engine.flops = 0
        eng_losses = engine.losses(coords, 0, coords.total, mu)
        _sync(dev)
        t_engine = min(t_engine, time.perf_counter() - t0)
        flops = engine.flops
        t0 = time.perf_counter()
        blk_losses = _block_reuse(model, coords, x, y, mu, args.baseline_channels_last)
        _sync(dev)
        t_block = min(t_block, time.perf_counter() - t0)
    fwd_flops = _forward_flops(engine)

    res = {
        "model": args.model, "input": "x".join(map(str, shape)), "batch": args.batch, "coords": coords.total,
        "params": sum(p.numel() for p in model.parameters()), "threads": args.threads,
        "query_batch": engine.query_batch, "max_elements": engine.max_elements,
        "baseline_channels_last": args.baseline_channels_last, "repeats": args.repeats,
        "dtype": args.dtype, "device": str(dev), "mu": mu,
        "engine_s": t_engine, "block_reuse_s": t_block,
        "engine_coords_per_s": coords.total / t_engine,
        "block_reuse_coords_per_s": coords.total / t_block,
        "speedup_vs_block_reuse": t_block / t_engine,
        "engine_flops_counted": flops,
        "engine_gflops": flops / t_engine / 1e9,
        "forward_gflop": fwd_flops / 1e9,
        "engine_flops_per_query_vs_forward": flops / coords.total / fwd_flops,
    }
    if not args.skip_naive:
        t0 = time.perf_counter()
        naive_losses = _naive(model, coords, x, y, mu, args.baseline_channels_last)
        _sync(dev)
        t_naive = time.perf_counter() - t0
        rel = ((eng_losses - naive_losses).abs() / naive_losses.abs()).max().item()
        rel_b = ((blk_losses - naive_losses).abs() / naive_losses.abs()).max().item()
        res.update({
            "naive_s": t_naive, "naive_coords_per_s": coords.total / t_naive,
            "speedup_vs_naive": t_naive / t_engine, "block_reuse_speedup_vs_naive": t_naive / t_block,
            "naive_gflops": fwd_flops * coords.total / t_naive / 1e9,
            "max_rel_error": rel, "max_rel_error_block_reuse": rel_b,
        })
    else:
        res["max_rel_error_vs_block_reuse"] = ((eng_losses - blk_losses).abs() / blk_losses.abs()).max().item()
    res["matmul_1thread_gflops"] = _matmul_gflops(dtype)
    if args.json:
        print(json.dumps(res), flush=True)
    else:
        for k, v in res.items():
            print(f"{k:34s} {v:.6g}" if isinstance(v, float) else f"{k:34s} {v}")
    return 0




__all__ = ["run", "build_parser"]
