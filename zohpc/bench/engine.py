"""``python -m zohpc.bench engine``: loss queries three ways on the same coordinates.

* naive: one full forward pass per query (parameter entry perturbed in place, restored).
* block reuse: DeepZero's feature reuse: the model is cut into blocks (the children of the
  model, with nn.Sequential containers expanded, so a ResNet BasicBlock or a single CNN layer
  is one block); a query re-runs the block that owns the perturbed parameter and everything
  after it, from the cached input of that block. One query per pass, as in DeepZero's code.
* engine: zohpc.zo.QueryEngine (per-layer downstream plan, incremental perturbed layer,
  one-channel deltas, ``query_batch`` stacked copies).

All three use BatchNorm batch statistics and leave running statistics alone, and run in one
process with the same allocator setting (the bench calls tune_malloc first, as a run's
set-up does; it is process-wide, so the baselines profit from it too). Every time, the
matmul and convolution peaks included, is read on zohpc.timing's clock: ``ZOHPC_CLOCK=cpu``
(with ``--threads 1``) gives CPU seconds, so the ratios hold on a machine shared with other
jobs, where wall time stretches with the load.
--baseline-channels-last also gives the baselines the NHWC memory order the engine uses. The coordinate
set is a seeded uniform sample over all parameter entries (what a random mask of that density
selects), so layers are represented in proportion to their size. Times include the one
unperturbed forward that block reuse and the engine need per minibatch.

engine_gflops counts the conv/linear FLOPs (2 x multiply-adds) that the engine actually
executes for the queries (one-channel delta convs, full convs downstream, the final linear);
elementwise, BatchNorm and pooling work is not counted. naive_gflops counts the same kind of
FLOPs for the full forward passes of the naive method.

Stop check: the engine is also timed with a stop check between stacked passes that reads a
flag and calls MPI Iprobe every time (``check_iprobe``), and one that calls Iprobe at most
every 0.1 s (``check_rate_limited``); ``check_*_overhead`` is the relative slow-down
against no check (noise level: compare with repeats > 1), ``check_*_ns_per_call`` the cost
of one call, to compare with ``seconds_per_pass``.

--task classify|regress: the cost of a black-box objective. The engine runs the same
coordinates with the torch objective (classify: the built-in cross entropy; regress: mean
squared error to (batch, classes) float targets, vectorized over copies) and with the same
objective computed per copy in numpy on detached outputs; the baselines are skipped.

--costs: the cost model (zohpc.zo.costs): calibration seconds, and predicted against
measured seconds per query of every parameter (Spearman rank correlation, total ratio).
"""

from __future__ import annotations

import argparse
import copy
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..comm import require_device, world
from ..errors import ConfigError
from ..models import MODEL_NAMES, build_model
from ..stop import StepAbandoned, no_check
from ..runtime import tune_malloc
from ..zo import Coordinates, Objective, QueryEngine
from ..models.token_transformer import TokenTransformer
from ..zo.costs import calibrate, measured_costs
from ..zo.work import rowwise_flops
from ..timing import clock_name, now as clock
from .report import emit

TASKS = ("classify", "regress")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits_cnn", choices=MODEL_NAMES + ("transformer",),
                   help="transformer: zohpc.models.token_transformer on token ids (--input TxV: length x vocab)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--coords", type=int, default=200, help="number of coordinates queried")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--input", default=None,
                   help="CxHxW (default 1x8x8 for digits_cnn, else 3x32x32); transformer: TxV (default 32x256)")
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
    p.add_argument("--task", choices=TASKS, default=None,
                   help="compare a black-box numpy objective with the torch one (skips the baselines)")
    p.add_argument("--costs", action="store_true", help="also evaluate the cost model against timings")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _parse_shape(text: str, dims: int = 3):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != dims or min(shape) < 1:
        raise ConfigError(f"option --input: {text!r} is not {'CxHxW' if dims == 3 else 'TxV'}")
    return shape


def _model_and_input(args, dtype, dev, gen):
    """The model and a minibatch (token ids for the transformer)."""
    if args.model == "transformer":
        T, V = _parse_shape(args.input, 2) if args.input else (32, 256)
        model = TokenTransformer(V, T, args.classes).to(device=dev, dtype=dtype).train()
        return model, (T, V), torch.randint(0, V, (args.batch, T), generator=gen).to(dev)
    shape = _parse_shape(args.input) if args.input else ((1, 8, 8) if args.model == "digits_cnn" else (3, 32, 32))
    model = build_model(args.model, shape, args.classes).to(device=dev, dtype=dtype).train()
    return model, shape, torch.randn(args.batch, *shape, generator=gen, dtype=dtype).to(dev)


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
        elif k == "rowwise":
            total += 2 * rowwise_flops(engine, n)
    return total


def _matmul_gflops(dtype, seconds=0.3):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        n = 512
        a = torch.randn(n, n, dtype=dtype)
        b = torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        reps, t0 = 0, clock()
        while clock() - t0 < seconds:
            torch.mm(a, b)
            reps += 1
        return 2 * n ** 3 * reps / (clock() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


def _conv_gflops(dtype, seconds=0.3):
    """One thread's 3x3 convolution rate (64 -> 64 channels, 32x32, batch 8, channels-last)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x = torch.randn(8, 64, 32, 32, dtype=dtype).contiguous(memory_format=torch.channels_last)
        conv = nn.Conv2d(64, 64, 3, padding=1, bias=False).to(dtype=dtype, memory_format=torch.channels_last)
        with torch.no_grad():
            conv(x)
            reps, t0 = 0, clock()
            while clock() - t0 < seconds:
                conv(x)
                reps += 1
        return 2 * 8 * 32 * 32 * 64 * 64 * 9 * reps / (clock() - t0) / 1e9
    finally:
        torch.set_num_threads(old)


def _work_flops(engine, coords) -> int:
    """The work model's conv/linear/attention FLOPs of every queried coordinate (zohpc.zo.work)."""
    return sum(plan.flops * n for plan, n in zip(engine.work(), coords.counts))


def _iprobe_check(comm, every: float = 0.0):
    """A stop check as a run installs it: a flag set by a signal handler, and MPI Iprobe for a
    stop announced by another rank (at most every ``every`` seconds; 0: every call)."""
    mpi = (comm or world()).mpi
    flag = {"stop": False}
    last = [0.0]

    def check():
        if flag["stop"]:
            raise StepAbandoned("stop requested")
        if every:
            now = time.monotonic()
            if now - last[0] < every:
                return
            last[0] = now
        if mpi.Iprobe():
            flag["stop"] = True  # (a real check would receive the announcement first)
            raise StepAbandoned("stop announced")

    return check


def _ns_per_call(check, calls: int = 20000) -> float:
    t0 = clock()
    for _ in range(calls):
        check()
    return (clock() - t0) / calls * 1e9


def _time_engine(engine, x, y, coords, mu, dev):
    """Seconds of one minibatch: prepare and every query (what a rank runs per step)."""
    _sync(dev)
    t0 = clock()
    engine.prepare(x, y)
    engine.flops = 0
    losses = engine.losses(coords, 0, coords.total, mu)
    _sync(dev)
    return clock() - t0, losses


def _numpy_cross_entropy(out, t):
    """Mean cross entropy of one copy in numpy (a black box: detached values, no autograd)."""
    z = out.detach().cpu().double().numpy()
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return float(np.mean(lse - z[np.arange(len(z)), t.cpu().numpy()]))


def _numpy_mse(out, t):
    return float(np.mean((out.detach().cpu().double().numpy() - t.cpu().double().numpy()) ** 2))


def _torch_mse(out, t):
    return ((out - t.unsqueeze(0)) ** 2).flatten(1).mean(1)


def _task_objectives(task, args, gen, dev, dtype):
    """(targets, torch objective, numpy black-box objective) of a bench task."""
    if task == "classify":
        y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(dev)
        return y, Objective(name=task), Objective(loss=_numpy_cross_entropy, name=task)
    y = torch.randn(args.batch, args.classes, generator=gen, dtype=dtype).to(dev)
    return y, Objective(batched=_torch_mse, name=task), Objective(loss=_numpy_mse, name=task)


def _spearman(a, b) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def _cost_model(engine, coords, x, y):
    cal = calibrate(engine, coords, x, y)
    t0 = clock()
    meas = np.array(measured_costs(engine, coords, x, y, repeats=2))  # min of 2: the first pass warms up
    t_meas = clock() - t0
    pred = np.array(cal.costs(engine, coords))
    act = [pi for pi, n in enumerate(coords.counts) if n > 0]
    return {"costs_calibration_s": cal.seconds, "costs_calibration_samples": len(cal.samples),
            "costs_measure_all_s": t_meas, "costs_spearman": _spearman(pred[act], meas[act]),
            "costs_total_ratio": float(pred[act].sum() / meas[act].sum())}


def check_args(args) -> None:
    """The options a run cannot use, as one line (every rank, through Comm.agree)."""
    for name in ("threads", "batch", "coords", "repeats"):
        if getattr(args, name) < 1:
            raise ConfigError(f"option --{name}: must be >= 1, got {getattr(args, name)}")
    least = 1 if args.task == "regress" else 2  # (regress: the output width)
    if args.classes < least:
        raise ConfigError(f"option --classes: must be >= {least}, got {args.classes}")
    if not math.isfinite(args.mu) or args.mu <= 0:
        raise ConfigError(f"option --mu: must be a finite step > 0, got {args.mu}")
    if args.seed < 0:
        raise ConfigError(f"option --seed: must be >= 0, got {args.seed}")
    require_device(args.device, "option --device")
    try:
        torch.device(args.device)
    except RuntimeError:
        raise ConfigError(f"option --device: {args.device!r} is not a torch device (cpu, cuda, cuda:N)") from None


def run(comm, args) -> dict:
    if comm is None:
        check_args(args)
    else:
        comm.agree(check_args, args)
    malloc_tuned = tune_malloc()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    model, shape, x = _model_and_input(args, dtype, dev, gen)
    y = torch.randint(0, args.classes, (args.batch,), generator=gen).to(dev)
    n = min(args.coords, sum(p.numel() for p in model.parameters()))
    coords = Coordinates(model, _sample_masks(model, n, gen))
    kw = {} if args.query_batch is None else {"query_batch": args.query_batch}
    mu = args.mu
    res = {
        "model": args.model, "input": "x".join(map(str, shape)), "batch": args.batch, "coords": coords.total,
        "params": sum(p.numel() for p in model.parameters()), "threads": args.threads,
        "malloc_tuned": malloc_tuned, "repeats": args.repeats, "clock": clock_name(), "dtype": args.dtype,
        "device": str(dev), "mu": mu,
    }
    if args.task:
        res.update(_run_task(model, x, coords, mu, dev, dtype, gen, kw, args))
    else:
        res.update(_run_methods(comm, model, x, y, coords, mu, dev, dtype, kw, args))
    if args.costs:
        res.update(_cost_model(QueryEngine(model, **kw), coords, x, y))
    res["matmul_1thread_gflops"] = _matmul_gflops(dtype)
    res["conv_1thread_gflops"] = _conv_gflops(dtype)
    if "work_gflops" in res:  # the roofline: achieved against this machine's measured peaks
        res["work_vs_matmul_peak"] = res["work_gflops"] / res["matmul_1thread_gflops"]
        res["work_vs_conv_peak"] = res["work_gflops"] / res["conv_1thread_gflops"]
    emit(res, args.json, width=34)
    return 0


def _run_task(model, x, coords, mu, dev, dtype, gen, kw, args) -> dict:
    y, obj_torch, obj_numpy = _task_objectives(args.task, args, gen, dev, dtype)
    engines = {"torch": QueryEngine(model, obj_torch, **kw), "blackbox": QueryEngine(model, obj_numpy, **kw)}
    for eng in engines.values():  # warm-up
        eng.prepare(x, y)
        eng.losses(coords, 0, min(coords.total, 2 * eng.query_batch), mu)
    best = {k: math.inf for k in engines}
    losses = {}
    for _ in range(max(1, args.repeats)):
        for k, eng in engines.items():
            t, losses[k] = _time_engine(eng, x, y, coords, mu, dev)
            best[k] = min(best[k], t)
    rel = ((losses["blackbox"] - losses["torch"]).abs() / losses["torch"].abs()).max().item()
    return {"task": args.task, "query_batch": engines["torch"].query_batch,
            "torch_objective_coords_per_s": coords.total / best["torch"],
            "blackbox_objective_coords_per_s": coords.total / best["blackbox"],
            "blackbox_slowdown": best["blackbox"] / best["torch"],
            "max_rel_error_blackbox_vs_torch": rel}


def _run_methods(comm, model, x, y, coords, mu, dev, dtype, kw, args) -> dict:
    engine = QueryEngine(model, **kw)
    blocks = not isinstance(model, TokenTransformer)  # (its forward is no chain of children: no block baseline)
    blk_losses = None
    checks = {"none": no_check, "iprobe": _iprobe_check(comm), "rate_limited": _iprobe_check(comm, 0.1)}
    # warm-up (allocator, oneDNN primitive caches) on a few coordinates, then timed runs
    engine.prepare(x, y)
    engine.losses(coords, 0, min(coords.total, 2 * engine.query_batch), mu)
    t_block = math.inf
    t_check = {k: math.inf for k in checks}
    for _ in range(max(1, args.repeats)):
        for k, check in checks.items():  # interleaved: drifts of a shared machine hit all alike
            engine.check = check
            t, losses = _time_engine(engine, x, y, coords, mu, dev)
            t_check[k] = min(t_check[k], t)
            if k == "none":
                eng_losses, flops = losses, engine.flops
        if blocks:
            t0 = clock()
            blk_losses = _block_reuse(model, coords, x, y, mu, args.baseline_channels_last)
            _sync(dev)
            t_block = min(t_block, clock() - t0)
    engine.check = no_check
    t_engine = t_check["none"]
    fwd_flops = _forward_flops(engine)
    res = {
        "query_batch": engine.query_batch, "max_elements": engine.max_elements,
        "baseline_channels_last": args.baseline_channels_last,
        "engine_s": t_engine, "block_reuse_s": t_block,
        "engine_coords_per_s": coords.total / t_engine,
        "block_reuse_coords_per_s": coords.total / t_block,
        "speedup_vs_block_reuse": t_block / t_engine,
        "engine_flops_counted": flops,
        "engine_gflops": flops / t_engine / 1e9,
        "forward_gflop": fwd_flops / 1e9,
        "engine_flops_per_query_vs_forward": flops / coords.total / fwd_flops,
        "work_gflops": _work_flops(engine, coords) / t_engine / 1e9,
        "free_queries": engine.free_count(coords),
        "stacked_passes": sum(1 for _ in engine.groups(coords, 0, coords.total, engine.batch_size)),
        "check_iprobe_coords_per_s": coords.total / t_check["iprobe"],
        "check_rate_limited_coords_per_s": coords.total / t_check["rate_limited"],
        "check_iprobe_overhead": t_check["iprobe"] / t_engine - 1,
        "check_rate_limited_overhead": t_check["rate_limited"] / t_engine - 1,
        "check_iprobe_ns_per_call": _ns_per_call(checks["iprobe"]),
        "check_rate_limited_ns_per_call": _ns_per_call(checks["rate_limited"]),
    }
    res["seconds_per_pass"] = t_engine / res["stacked_passes"]
    if not blocks:
        res.update(block_reuse_s=None, block_reuse_coords_per_s=None, speedup_vs_block_reuse=None)
    if not args.skip_naive:
        t0 = clock()
        naive_losses = _naive(model, coords, x, y, mu, args.baseline_channels_last)
        _sync(dev)
        t_naive = clock() - t0
        rel = ((eng_losses - naive_losses).abs() / naive_losses.abs()).max().item()
        rel_b = ((blk_losses - naive_losses).abs() / naive_losses.abs()).max().item() if blocks else None
        res.update({
            "naive_s": t_naive, "naive_coords_per_s": coords.total / t_naive,
            "speedup_vs_naive": t_naive / t_engine, "block_reuse_speedup_vs_naive": t_naive / t_block if blocks else None,
            "naive_gflops": fwd_flops * coords.total / t_naive / 1e9,
            "max_rel_error": rel, "max_rel_error_block_reuse": rel_b,
        })
    elif blocks:
        res["max_rel_error_vs_block_reuse"] = ((eng_losses - blk_losses).abs() / blk_losses.abs()).max().item()
    return res


__all__ = ["run", "build_parser"]
