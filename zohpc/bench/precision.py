"""``python -m zohpc.bench precision``: the delta precision modes' error and speed against IEEE.

Measures the CGE estimate of each ``zo.precision`` mode (zohpc.zo.delta) on a seeded sample of
coordinates (``--per-param`` entries of every parameter, so every layer is represented) of a
float32 model on one random minibatch, against float64 differences (the same model in
float64, the same engine in IEEE mode):

* ``rel_error``: ||g - g64|| / ||g64|| of the estimate; ``step_rel_error``: the same for the
  first Adam step it gives (an SGD step's error is the estimate's);
* ``speedup``: seconds of the IEEE float32 estimate over the mode's (the same coordinates,
  after one warm-up pass; process CPU time on a CPU, so a loaded machine reads true with
  ``--threads 1``, synchronized wall time on CUDA), with the kernels named in ``kernels``: on a CPU TF32 is emulated
  (operands rounded, float32 products: the error figure, not a speed), bf16 runs the CPU's
  bf16 kernels (``rel_error_native``: their error, outputs also rounded to bf16); on CUDA
  both run on tensor cores, IEEE with TF32 off. ``cpu_bf16_kernels`` says whether this CPU
  has native bf16 instructions (AVX512-BF16 or AMX); without them bf16 is slower here.

``--model``: a zoo name (resnet20, ...) on ``--image``-sized random images, or
``transformer`` (a two-layer token transformer on random tokens).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from ..errors import ConfigError
from ..models import MODEL_NAMES, build_model
from ..models.token_transformer import TokenTransformer
from ..zo import Coordinates, QueryEngine, cge

MODES = ("delta-tf32", "delta-bf16")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.bench precision", description=__doc__.split("\n\n")[1])
    p.add_argument("--model", default="resnet20", help=f"{', '.join(MODEL_NAMES)} or transformer")
    p.add_argument("--batch", type=int, default=32, help="minibatch size (default 32)")
    p.add_argument("--image", type=int, default=32, help="image side for zoo models (default 32)")
    p.add_argument("--per-param", type=int, default=4, help="coordinates sampled per parameter (default 4)")
    p.add_argument("--mu", type=float, default=5e-3, help="finite-difference step (default 5e-3)")
    p.add_argument("--query-batch", type=int, default=32)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _problem(args, device):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if args.model == "transformer":
        vocab, length = 100, 16
        model = TokenTransformer(vocab, length, 10)
        x = torch.randint(0, vocab, (args.batch, length), generator=g)
    elif args.model in MODEL_NAMES:
        shape = (1, 8, 8) if args.model == "digits_cnn" else (3, args.image, args.image)
        model = build_model(args.model, shape, 10)
        x = torch.randn(args.batch, *shape, generator=g)
    else:
        raise ConfigError(f"--model: {args.model!r} is not one of {', '.join(MODEL_NAMES)}, transformer")
    y = torch.randint(0, 10, (args.batch,), generator=g)
    return model.to(device).train(), x.to(device), y.to(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _estimate(model, x, y, coords, args, device, **kw):
    """(estimate, seconds after a warm-up, engine)."""
    eng = QueryEngine(model, query_batch=args.query_batch, **kw)
    eng.prepare(x, y)
    cge(eng, coords, args.mu)  # warm-up (allocator, kernel selection)
    clock = time.perf_counter if device.type == "cuda" else time.process_time  # CPU time: robust to load
    _sync(device)
    t0 = clock()
    est = cge(eng, coords, args.mu)
    _sync(device)
    return est.double().cpu(), clock() - t0, eng


def _adam_step(grad):
    p = torch.zeros_like(grad, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1e-3)
    p.grad = grad.clone()
    opt.step()
    return p.detach()


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _cpu_bf16_kernels() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def run(comm, args):
    if comm is not None and comm.size > 1:
        raise ConfigError("zohpc.bench precision runs on one rank")
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    model, x, y = _problem(args, device)
    g = torch.Generator().manual_seed(3)
    masks = {n: torch.rand(p.shape, generator=g) < args.per_param / p.numel() for n, p in model.named_parameters()}
    coords = Coordinates(model, masks)
    ref_model = copy.deepcopy(model).double()
    ref, _, _ = _estimate(ref_model, x.double() if x.is_floating_point() else x, y, coords, args, device)
    ref_step = _adam_step(ref)

    cuda = device.type == "cuda"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # IEEE float32 really
    try:
        ieee, t_ieee, _ = _estimate(model, x, y, coords, args, device)
        out = {"model": args.model, "device": device.type, "batch": args.batch, "coordinates": coords.total,
               "mu": args.mu, "ieee": {"rel_error": _rel(ieee, ref), "step_rel_error": _rel(_adam_step(ieee), ref_step),
                                       "seconds": t_ieee},
               "cpu_bf16_kernels": None if cuda else _cpu_bf16_kernels(), "modes": {}}
        for mode in MODES:
            est, t_emul, eng = _estimate(model, x, y, coords, args, device, precision=mode, native_lowp=False)
            row = {"rel_error": _rel(est, ref), "step_rel_error": _rel(_adam_step(est), ref_step),
                   "fallbacks": sorted(eng.precision_fallbacks)}
            if cuda or mode == "delta-bf16":
                nat, t_nat, _ = _estimate(model, x, y, coords, args, device, precision=mode, native_lowp=True)
                row.update(rel_error_native=_rel(nat, ref), speedup=t_ieee / t_nat, seconds=t_nat,
                           kernels="tensor cores" if cuda else "cpu bf16")
            else:
                row.update(speedup=t_ieee / t_emul, seconds=t_emul, kernels="emulated")
            out["modes"][mode] = row
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    if args.json:
        print(json.dumps(out))
    else:
        print(f"{args.model} on {device.type}, batch {args.batch}, {coords.total} coordinates, mu {args.mu}")
        print(f"  ieee        rel_error {out['ieee']['rel_error']:.2e}  {t_ieee:.2f} s")
        for mode, row in out["modes"].items():
            print(f"  {mode:11s} rel_error {row['rel_error']:.2e}  step {row['step_rel_error']:.2e}  "
                  f"speedup {row['speedup']:.2f}x ({row['kernels']})")


__all__ = ["build_parser", "run"]
