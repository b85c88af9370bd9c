"""Pruning at initialization: ZO-GraSP (loss values only), GraSP (autograd), random, magnitude.

The result is a set of coordinate masks (see :mod:`zohpc.masks`: True = active, only
conv/linear weights masked) whose per-layer sparsity ratios drive DeepZero's layer-wise
random sparse CGE. ``python -m zohpc.prune`` writes them to an HDF5 mask file.

GraSP (Wang et al., 2020) scores each weight by ``S = -theta * (H g)`` (``g`` the loss
gradient, ``H`` the Hessian) and removes the weights with the HIGHEST ``S``: removing them
reduces the gradient flow ``g^T g`` least (or increases it). Equivalently it keeps the
lowest ``S``, so the importance handed to :func:`zohpc.masks.masks_from_scores` (higher =
keep) is ``-S = theta * Hg``.

ZO-GraSP (DeepZero) estimates ``g`` and ``Hg`` from loss values with RGE
(:mod:`zohpc.zo.rge`, the one RGE core: its scaling convention, unit directions over ALL ``d``
parameters, biases and BatchNorm too, and the ``d / q`` factor that makes the estimate
unbiased, so ZO and autograd scores are on the same scale):
``g0 = RGE(theta)``, ``g1 = RGE(theta + mu * g0)``, ``Hg ~ (g1 - g0) / mu``.
The SAME directions serve ``g0`` and ``g1`` (common random numbers): ``g1 - g0`` then only
carries the change of the directional derivatives, not the sampling noise of two
independent direction sets, and the mu^2 curvature bias of the forward difference cancels
to first order. Cost: ``2 (q + 1)`` loss evaluations on the pruning batch.

Our ``grasp`` is the first-order reference of exactly that quantity: ``g`` and ``Hg`` over
all parameters by autograd, plain cross entropy (the original GraSP code differentiates
the weights only and divides the logits by a temperature of 200; with loss values only that
would push the differences below float32 resolution).

Pruning batch: ``prune.samples_per_class`` training examples of each class, chosen by a
seeded permutation (GraSP's reference code uses 25 per class). Losses: per-example cross
entropy averaged in float64 (keeps the rounding noise of the loss below the tiny second
differences ZO-GraSP takes), BatchNorm with batch statistics
(:func:`~zohpc.zo.batchnorm.batch_stats_only`); queries are functional, so the caller's
model (parameters and buffers) is never modified.

Speed and distribution: the perturbed losses are full forwards of the pruning batch,
stacked by :class:`~zohpc.zo.stacked.StackedForward`; directions are regenerated from
``zohpc.seeding`` (tag ``"zo-grasp-direction"``, parts ``(seed, j)``), never held ``q x d``.
Each rank evaluates a contiguous block of the ``q`` directions and one ``allgatherv`` of
float64 loss values per phase joins them (:func:`zohpc.zo.rge.sharded_losses`); every rank
then forms the same estimate, and the driver's masks are broadcast. The stop ``check`` runs
between stacked passes.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import ConfigError, DataError
from .fsio import check_new_file
from .masks import layer_ratios, maskable_names, masks_from_scores, write_mask_file
from .seeding import generator
from .inputs import model_input
from .stop import no_check
from .zo.batchnorm import batch_stats_only
from .zo.coords import Coordinates
from .zo.rge import active_scatter, rge_coefficients, rge_combine, sharded_losses
from .zo.stacked import StackedForward

METHODS = ("zo_grasp", "grasp", "random", "magnitude")
DIRECTION_TAG = "zo-grasp-direction"  # zohpc.seeding stream of ZO-GraSP's directions, parts (seed, j)


# ---------------------------------------------------------------------------- data
@dataclass
class PruningData:
    """What pruning at initialization scores on: the training inputs and targets, and the
    number of classes (0 when the targets are not class labels)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    num_classes: int

    @classmethod
    def of_task(cls, task) -> "PruningData":
        x, y = task.train
        classes = int(y.max()) + 1 if (not y.is_floating_point() and y.dim() == 1 and y.numel()) else 0
        return cls(x, y, classes)


def select_prune_batch(train_x: torch.Tensor, train_y: torch.Tensor, num_classes: int,
                       samples_per_class: int, seed: int):
    """``samples_per_class`` examples of each class, drawn from ``seed``
    (:func:`zohpc.data.class_balanced_indices`), grouped by class.

    A class with fewer examples contributes all it has; no examples at all is a DataError.
    Targets that are not class labels (``num_classes`` 0: regression, images, ...) give
    ``10 * samples_per_class`` examples drawn by a seeded permutation.
    """
    from .data import class_balanced_indices
    from .seeding import generator

    if int(num_classes) <= 0:
        n = train_x.shape[0]
        if n == 0:
            raise DataError("training data has no examples to prune with")
        idx = torch.randperm(n, generator=generator("prune-batch", seed))[:10 * int(samples_per_class)]
        return train_x[idx.to(train_x.device)], train_y[idx.to(train_y.device)]
    idx = class_balanced_indices(train_y.reshape(-1), int(samples_per_class), int(seed), int(num_classes))
    if idx.numel() == 0:
        raise DataError("training data has no examples to prune with")
    return train_x[idx.to(train_x.device)], train_y.reshape(-1)[idx.to(train_y.device)]


# ---------------------------------------------------------------------------- losses
def cross_entropy64(outputs: torch.Tensor, targets: torch.Tensor, Q: int = 1) -> torch.Tensor:
    """Mean cross entropy of each of ``Q`` stacked copies, per-example losses averaged in float64."""
    ce = F.cross_entropy(outputs, targets.reshape(-1).repeat(Q), reduction="none")
    return ce.double().view(Q, -1).mean(1)


def _world(comm):
    if comm is None:
        from .comm import world

        comm = world()
    return comm


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _unflatten(model: nn.Module, flat: torch.Tensor) -> dict[str, torch.Tensor]:
    named = list(model.named_parameters())
    pieces = flat.split([p.numel() for _, p in named])
    return {n: v.reshape(p.shape).to(p.dtype) for (n, p), v in zip(named, pieces)}


def zo_grasp_hg(model: nn.Module, x: torch.Tensor, y: torch.Tensor, queries: int = 192, mu: float = 5e-3,
                seed: int = 0, comm=None, *, objective=None, query_batch: int = 32, check=no_check):
    """ZO estimates ``(g0, Hg)`` over the trainable parameters (zeros for frozen ones), as dicts
    name -> tensor (see the module docstring); frozen parameters are never perturbed.

    ``objective``: ``(outputs, targets, Q) -> (Q,)`` (default :func:`cross_entropy64`).
    """
    fwd = StackedForward(model, cross_entropy64 if objective is None else objective, query_batch)
    coords = Coordinates(model)  # the trainable coordinates
    scatter = None if coords.total == fwd.dim else active_scatter(coords)

    def full(v):
        return v if scatter is None else scatter(v[None])[0]

    d, parts = coords.total, (int(seed),)
    # every rank computes the base losses; a task error there is reported on every rank (exit 2)
    prepare = fwd.prepare if comm is None else (lambda *a, **k: comm.agree(fwd.prepare, *a, **k))
    f0 = float(prepare(x, y))
    d0 = (sharded_losses(fwd, d, parts, queries, mu, comm, scatter=scatter, check=check, tag=DIRECTION_TAG) - f0) / mu
    g0 = full(rge_combine(rge_coefficients(d0, d), d, parts, tag=DIRECTION_TAG, device=fwd.device))
    f1 = float(prepare(x, y, center=_flat_params(model).double() + mu * g0))
    d1 = (sharded_losses(fwd, d, parts, queries, mu, comm, scatter=scatter, check=check, tag=DIRECTION_TAG) - f1) / mu
    hg = full(rge_combine(rge_coefficients((d1 - d0) / mu, d), d, parts, tag=DIRECTION_TAG, device=fwd.device))  # (g1 - g0) / mu
    return _unflatten(model, g0), _unflatten(model, hg)


def grasp_hg(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    """Autograd ``(g, Hg)`` over all parameters, on the same loss as :func:`zo_grasp_hg`."""
    p0 = next(model.parameters())
    x = model_input(x, p0)
    params = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    # the math attention kernel: the fused ones have no double backward (Hg needs it)
    with batch_stats_only(model), sdpa_kernel([SDPBackend.MATH]):
        loss = cross_entropy64(torch.func.functional_call(model, params, (x,)), y.to(p0.device))[0]
        grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
        z = sum((g.detach() * g).sum() for g in grads)
        hg = torch.autograd.grad(z, list(params.values()))
    names = list(params)
    return ({n: g.detach() for n, g in zip(names, grads)}, {n: h.detach() for n, h in zip(names, hg)})


def grasp_scores(model: nn.Module, hg: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GraSP's score ``S = -theta * Hg`` per maskable weight (HIGHEST S is removed)."""
    params = dict(model.named_parameters())
    return {n: -(params[n].detach() * hg[n].to(params[n].device).reshape(params[n].shape)) for n in maskable_names(model)}


def importance_scores(model: nn.Module, method: str, x: torch.Tensor, y: torch.Tensor, prune_cfg, seed: int,
                      comm=None, *, query_batch: int = 32, check=no_check, objective=None) -> dict[str, torch.Tensor]:
    """Per-maskable-weight importance (higher = keep) for ``method``."""
    params = dict(model.named_parameters())
    names = maskable_names(model)
    if method in ("zo_grasp", "grasp"):
        if method == "zo_grasp":
            _, hg = zo_grasp_hg(model, x, y, prune_cfg.queries, prune_cfg.mu, seed, comm,
                                query_batch=query_batch, check=check, objective=objective)
        else:
            _, hg = grasp_hg(model, x, y)
        return {n: -s for n, s in grasp_scores(model, hg).items()}  # keep the lowest S
    if method == "magnitude":
        return {n: params[n].detach().abs() for n in names}
    if method == "random":
        gen = generator("random-prune", seed)
        return {n: torch.rand(params[n].shape, generator=gen, dtype=torch.float64) for n in names}
    raise ConfigError(f"config key 'prune.method': {method!r} is not one of {', '.join(METHODS)}")


def _bcast_masks(masks: dict[str, torch.Tensor], comm) -> dict[str, torch.Tensor]:
    if comm.size == 1 or not masks:
        return masks
    flat = torch.cat([m.reshape(-1) for m in masks.values()]).to(torch.uint8).cpu().contiguous()
    comm.bcast_(flat, 0)
    out, offset = {}, 0
    for n, m in masks.items():
        out[n] = flat[offset:offset + m.numel()].bool().reshape(m.shape)
        offset += m.numel()
    return out


def prune_masks(model: nn.Module, method: str, sparsity: float, data_splits, prune_cfg, seed: int, comm=None, *,
                query_batch: int = 32, check=no_check, objective=None):
    """Masks at initialization for ``model``: ``(masks, ratios)``, identical on every rank.

    ``data_splits`` needs ``train_x``, ``train_y`` and ``num_classes``; the pruning batch is
    :func:`select_prune_batch` with ``prune_cfg.samples_per_class``. Global pruning to
    ``round(sparsity * total)`` inactive coordinates (see :func:`zohpc.masks.masks_from_scores`).
    The model is not modified. ZO-GraSP options: ``query_batch`` (copies per stacked pass),
    ``check`` (the stop check run between passes; StepAbandoned propagates), ``objective``
    (the task's ``(outputs, targets, Q) -> (Q,)``; default :func:`cross_entropy64`).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"config key 'prune.sparsity': {sparsity!r} is out of range (must be in [0, 1))")
    comm = _world(comm)
    x, y = select_prune_batch(data_splits.train_x, data_splits.train_y, data_splits.num_classes,
                              prune_cfg.samples_per_class, seed)
    scores = importance_scores(model, method, x, y, prune_cfg, seed, comm, query_batch=query_batch, check=check,
                               objective=objective)
    masks, _ = masks_from_scores(scores, sparsity)
    masks = _bcast_masks(masks, comm)
    return masks, layer_ratios(masks)


# ---------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zohpc.prune", description="Prune at initialization and write an HDF5 mask file.")
    p.add_argument("--config", metavar="FILE", help="TOML config (defaults: the embedded digits run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable (e.g. --set prune.queries=64)")
    p.add_argument("--method", metavar="M", help="zo_grasp | grasp | random | magnitude (default: prune.method)")
    p.add_argument("--sparsity", metavar="S", type=float, help="global sparsity in [0, 1) (default: prune.sparsity)")
    p.add_argument("--out", metavar="FILE.h5", required=True, help="mask file to write (atomically)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists (refused otherwise)")
    p.add_argument("--seed", metavar="N", type=int, help="seed of the pruning batch and directions (default: train.seed)")
    return p


def _setup(args):
    """Config and path checks (run on every rank through Comm.agree)."""
    from .config import load_config, validate

    cfg = load_config(args.config, args.overrides)
    if args.method is not None:
        cfg.prune.method = args.method
    if args.sparsity is not None:
        cfg.prune.sparsity = args.sparsity
    validate(cfg)
    if cfg.task.name != "classify":
        raise ConfigError(f"config key 'task.name': zohpc.prune writes masks for the classify task (model.name "
                          f"on data.name), not for {cfg.task.name!r}; a run of that task prunes at its own "
                          f"start-up (prune.method)")
    if cfg.prune.method not in METHODS:
        raise ConfigError(f"config key 'prune.method': {cfg.prune.method!r} cannot write masks (use one of {', '.join(METHODS)})")
    seed = cfg.train.seed if args.seed is None else args.seed
    if seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {seed}")
    out = args.out
    check_new_file(out, "--out", args.force)
    parent = os.path.dirname(os.path.abspath(out))
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe) or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--out '{out}': directory '{probe}' is not writable")
    return cfg, seed


def _load(cfg):
    from .data import load_data

    return load_data(cfg.data, cfg.train.seed)


def format_ratio_table(model: nn.Module, masks: dict[str, torch.Tensor], ratios: dict[str, float]) -> str:
    width = max([len("layer")] + [len(n) for n in masks])
    lines = [f"{'layer':<{width}}  {'shape':<18} {'numel':>8} {'active':>8} {'sparsity':>8}"]
    total = inactive = 0
    for n, m in masks.items():
        shape = "x".join(str(s) for s in m.shape)
        act = int(m.sum())
        total += m.numel()
        inactive += m.numel() - act
        lines.append(f"{n:<{width}}  {shape:<18} {m.numel():>8} {act:>8} {ratios[n]:>8.4f}")
    lines.append(f"{'total':<{width}}  {'':<18} {total:>8} {total - inactive:>8} {inactive / max(1, total):>8.4f}")
    return "\n".join(lines)


def run(comm, argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg, seed = comm.agree(_setup, args)
    comm.agree(comm.set_threads)
    device = comm.agree(comm.bind_device, cfg.train.device)
    splits = comm.agree(_load, cfg)
    from .models import build_model

    # Same initialization as training: the trainer seeds torch.manual_seed(train.seed) right before build_model.
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model.name, splits.input_shape, splits.num_classes).to(device)
    masks, ratios = prune_masks(model, cfg.prune.method, cfg.prune.sparsity, splits, cfg.prune, seed, comm,
                                query_batch=cfg.zo.query_batch)
    if comm.is_driver:
        extra = {"data": cfg.data.name, "train_seed": cfg.train.seed, "queries": cfg.prune.queries,
                 "mu": cfg.prune.mu, "samples_per_class": cfg.prune.samples_per_class, "ranks": comm.size}
        write_mask_file(args.out, model_name=cfg.model.name, masks=masks, method=cfg.prune.method, seed=seed,
                        sparsity=cfg.prune.sparsity, ratios=ratios, extra=extra)
        print(f"{cfg.prune.method} masks for {cfg.model.name} at sparsity {cfg.prune.sparsity} "
              f"(seed {seed}, {comm.size} rank(s)):")
        print(format_ratio_table(model, masks, ratios))
        print(f"wrote {args.out}")
        sys.stdout.flush()
    comm.barrier()
    return 0


def main(argv=None) -> None:
    from .comm import run_main

    run_main(lambda comm: run(comm, argv), "zohpc.prune")


if __name__ == "__main__":
    main()
