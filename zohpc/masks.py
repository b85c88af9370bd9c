"""Coordinate masks for sparse zeroth-order training, and the HDF5 mask files that hold them.

Conventions (used everywhere in zohpc):

- A mask is a ``torch.bool`` tensor of the parameter's shape; ``True`` = ACTIVE coordinate
  (kept, queried by sparse CGE), ``False`` = inactive (its gradient estimate is 0).
- Only conv and linear WEIGHTS are masked. Biases and BatchNorm parameters are always
  active and never appear in a mask dict.
- A per-layer *ratio* is that weight's SPARSITY: the fraction of inactive (False) entries.
- Global sparsity = inactive entries / all maskable entries.

Mask file (``format = "zohpc-masks"``, version 1, written atomically through
:mod:`zohpc.h5util`): root attributes ``model_name``, ``method``, ``seed``, ``sparsity``
(requested), ``achieved_sparsity``, ``zohpc_version``, ``layer_names`` (the masked
parameters in model order); group ``masks/`` with one boolean dataset per masked parameter
(checksummed), each carrying attributes ``ratio`` and ``shape``; optional group ``extra/``
whose attributes hold free-form scalars/strings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from ._version import __version__
from .errors import CheckpointError
from .seeding import generator

FORMAT_NAME = "zohpc-masks"
FORMAT_VERSION = 1
MASKABLE_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# ---------------------------------------------------------------------------- which weights
def maskable_names(model: nn.Module) -> list[str]:
    """Names of trainable conv/linear weights, in ``named_parameters`` order (the masked
    coordinates; frozen weights have no active coordinate to mask)."""
    weight_ids = set()
    for module in model.modules():
        if isinstance(module, MASKABLE_TYPES) and isinstance(getattr(module, "weight", None), nn.Parameter):
            weight_ids.add(id(module.weight))
    return [name for name, p in model.named_parameters() if id(p) in weight_ids and p.requires_grad]


def maskable_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    params = dict(model.named_parameters())
    return {name: tuple(params[name].shape) for name in maskable_names(model)}


def _shapes_of(model_or_shapes) -> dict[str, tuple[int, ...]]:
    if isinstance(model_or_shapes, nn.Module):
        return maskable_shapes(model_or_shapes)
    return {name: tuple(int(s) for s in shape) for name, shape in model_or_shapes.items()}


def layer_ratios(masks: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-layer sparsity: fraction of inactive entries of each mask."""
    return {name: float((~m).sum().item()) / max(1, m.numel()) for name, m in masks.items()}


def global_sparsity(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    inactive = sum(int((~m).sum().item()) for m in masks.values())
    return inactive / max(1, total)


# ---------------------------------------------------------------------------- global pruning
def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float):
    """Global pruning: deactivate the ``round(sparsity * total)`` LOWEST-scored coordinates.

    ``scores`` are importances (higher = keep), one tensor per maskable weight, in a fixed
    order (the dict order). Ties are broken deterministically: among equal scores the one
    earlier in the concatenation (dict order, then row-major index) is removed first. The
    ranking is done in float64 with a stable sort, so every rank computes the same mask.
    Returns ``(masks, ratios)``.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    names = list(scores)
    flat = np.concatenate([scores[n].detach().double().reshape(-1).cpu().numpy() for n in names]) if names else np.zeros(0)
    if np.isnan(flat).any():
        raise ValueError("pruning scores contain NaN")
    total = flat.size
    n_remove = int(round(sparsity * total))
    keep = np.ones(total, dtype=bool)
    if n_remove > 0:
        order = np.argsort(flat, kind="stable")
        keep[order[:n_remove]] = False
    masks, offset = {}, 0
    for n in names:
        numel = scores[n].numel()
        masks[n] = torch.from_numpy(keep[offset:offset + numel].copy()).reshape(scores[n].shape)
        offset += numel
    return masks, layer_ratios(masks)


# ---------------------------------------------------------------------------- layer-wise random
def mask_draw(epoch: int, mask_interval: int) -> int:
    """DeepZero's protocol: a fresh mask every ``mask_interval`` epochs (0 = fixed mask, draw 0)."""
    if mask_interval < 0:
        raise ValueError(f"mask_interval must be >= 0, got {mask_interval}")
    return 0 if mask_interval == 0 else int(epoch) // int(mask_interval)


def layerwise_random_masks(model_or_shapes, ratios: dict[str, float], seed: int, draw: int) -> dict[str, torch.Tensor]:
    """Each layer gets exactly ``round(ratio * numel)`` inactive entries, uniformly at random.

    One CPU generator, ``zohpc.seeding.generator("layerwise-mask", seed, draw)``, serves
    the layers in model order (``maskable_names`` order, or the given dict's order): layer
    ``l`` deactivates the first ``k_l`` entries of ``torch.randperm(numel_l, generator=gen)``.
    Same (seed, draw) -> the same masks on every rank and every resume.
    """
    shapes = _shapes_of(model_or_shapes)
    missing = [n for n in shapes if n not in ratios]
    if missing:
        raise ValueError(f"no sparsity ratio for layer(s) {', '.join(missing)}")
    gen = generator("layerwise-mask", seed, draw)
    masks = {}
    for name, shape in shapes.items():
        ratio = float(ratios[name])
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"ratio of layer {name} must be in [0, 1], got {ratio}")
        numel = int(np.prod(shape)) if shape else 1
        k = int(round(ratio * numel))
        flat = torch.ones(numel, dtype=torch.bool)
        flat[torch.randperm(numel, generator=gen)[:k]] = False
        masks[name] = flat.reshape(shape)
    return masks


# ---------------------------------------------------------------------------- the schedule of a run
class MaskSchedule:
    """Which coordinates are active in each epoch: dense, fixed, or layer-wise random.

    DeepZero's protocol draws a fresh random mask with fixed per-layer ratios every
    ``interval`` epochs; a draw is a pure function of (seed, draw), so a resumed run and
    every rank see the same masks. ``fixed``: one mask for the whole run (interval 0).
    """

    def __init__(self, shapes: dict, seed: int, interval: int, ratios=None, fixed=None, source="dense"):
        self.shapes, self.seed, self.interval = shapes, seed, interval
        self.ratios = None if ratios is None else {k: float(v) for k, v in ratios.items()}
        self.fixed = fixed if interval == 0 else None
        self.source = source

    def draw(self, epoch: int) -> int:
        return mask_draw(epoch, self.interval) if self.ratios is not None else 0

    def masks(self, epoch: int):
        if self.ratios is None:
            return None
        if self.fixed is not None:
            return self.fixed
        return layerwise_random_masks({n: self.shapes[n] for n in self.ratios}, self.ratios, self.seed,
                                      self.draw(epoch))

    def state_dict(self, epoch: int) -> dict:
        """What a checkpoint keeps: the masks in effect at ``epoch`` (a fixed mask is the whole
        schedule; a random one is re-drawn from its ratios), the ratios, the source."""
        masks = self.masks(epoch) or {}
        return {"masks": {n: m.cpu() for n, m in masks.items()}, "ratios": self.ratios, "source": self.source,
                "fixed": self.fixed is not None}

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict` (``ratios`` None in checkpoints that predate them:
        the ratios are those of the stored masks). Dense stays dense."""
        ratios = state.get("ratios")
        masks = state.get("masks") or {}
        if ratios is None and masks:
            ratios = layer_ratios(masks)
        if ratios is None:
            return
        fixed = {n: m.to(torch.bool) for n, m in masks.items()} if state.get("fixed", True) else None
        self.ratios = {k: float(v) for k, v in ratios.items()}
        self.fixed = fixed if self.interval == 0 else None
        self.source = f"{state.get('source') or 'checkpoint'} (from the checkpoint)"


# ---------------------------------------------------------------------------- files
@dataclass
class MaskFile:
    """A mask file's content; ``masks`` are bool tensors (True = active), in model order."""

    model_name: str
    method: str
    seed: int
    sparsity: float
    ratios: dict[str, float]
    masks: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]
    achieved_sparsity: float = 0.0
    zohpc_version: str = ""
    extra: dict = field(default_factory=dict)


def write_mask_file(path: str, *, model_name: str, masks: dict[str, torch.Tensor], method: str, seed: int,
                    sparsity: float, ratios: dict[str, float] | None = None, extra: dict | None = None) -> None:
    """Write ``masks`` atomically as a ``zohpc-masks`` HDF5 file (see the module docstring).

    ``ratios`` are stored as given when supplied (checked against the masks), else computed.
    """
    import h5py

    from .h5util import atomic_h5, write_array

    actual = layer_ratios(masks)
    if ratios is None:
        ratios = actual
    for name in masks:
        numel = max(1, masks[name].numel())
        if name not in ratios or abs(float(ratios[name]) - actual[name]) > 0.5 / numel:
            raise ValueError(f"ratio of layer {name} does not match its mask")
    with atomic_h5(path, FORMAT_NAME, FORMAT_VERSION, in_memory=True) as fh:
        fh.attrs["model_name"] = str(model_name)
        fh.attrs["method"] = str(method)
        fh.attrs["seed"] = int(seed)
        fh.attrs["sparsity"] = float(sparsity)
        fh.attrs["achieved_sparsity"] = float(global_sparsity(masks))
        fh.attrs["zohpc_version"] = __version__
        fh.attrs["layer_names"] = np.array(list(masks), dtype=h5py.string_dtype())
        group = fh.create_group("masks")
        for name, mask in masks.items():
            if "/" in name:
                raise ValueError(f"parameter name {name!r} cannot contain '/'")
            ds = write_array(group, name, mask.detach().cpu().numpy().astype(bool))
            ds.attrs["ratio"] = float(ratios[name])
            ds.attrs["shape"] = np.array(mask.shape, dtype=np.int64)
        ex = fh.create_group("extra")
        for key, value in (extra or {}).items():
            if isinstance(value, (bool, int, float, str, np.integer, np.floating)):
                ex.attrs[str(key)] = value
            else:
                ex.attrs[str(key)] = str(value)


def _str(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _read(path: str, want: dict | None = None) -> MaskFile:
    import h5py

    from .h5util import attr_str, open_verified, read_array

    fh = open_verified(path, FORMAT_NAME, FORMAT_VERSION)
    with fh:
        model_name = attr_str(fh, "model_name", path)
        method = attr_str(fh, "method", path)
        for key in ("seed", "sparsity", "achieved_sparsity", "layer_names"):
            if key not in fh.attrs:
                raise CheckpointError(f"{path}: attribute '{key}' missing (incomplete file)")
        seed = int(fh.attrs["seed"])
        sparsity = float(fh.attrs["sparsity"])
        achieved = float(fh.attrs["achieved_sparsity"])
        version = _str(fh.attrs.get("zohpc_version", ""))
        names = [_str(n) for n in np.asarray(fh.attrs["layer_names"]).reshape(-1)]
        if "masks" not in fh:
            raise CheckpointError(f"{path}: group 'masks' missing (incomplete file)")
        group = fh["masks"]
        stored = set(group.keys())
        if stored != set(names):
            raise CheckpointError(f"{path}: masks group does not match layer_names (corrupted file)")
        masks, ratios, shapes = {}, {}, {}
        for name in want or {}:
            if name not in stored:
                raise CheckpointError(f"{path}: no mask for parameter '{name}' of the model (file is for model "
                                      f"'{model_name}')")
        for name in names:
            if want is not None:  # against the model before reading anything
                if name not in want:
                    raise CheckpointError(f"{path}: mask for '{name}', which is not a conv/linear weight of the model")
                ds = group[name]
                if not isinstance(ds, h5py.Dataset) or tuple(ds.shape or ()) != tuple(want[name]) \
                        or ds.dtype != np.uint8:
                    found = f"shape {_fmt_shape(ds.shape or ())} ({ds.dtype})" if isinstance(ds, h5py.Dataset) \
                        else "no data (a group)"
                    raise CheckpointError(f"{path}: mask '{name}' has {found}, the model's parameter has shape "
                                          f"{_fmt_shape(want[name])} (a boolean mask is stored as uint8)")
            data = read_array(group, name, path)
            ds = group[name]
            if data.dtype != np.bool_:
                raise CheckpointError(f"{path}: mask '{name}' is not boolean (corrupted file)")
            shape = tuple(int(s) for s in np.asarray(ds.attrs.get("shape", data.shape)).reshape(-1))
            if shape != tuple(data.shape):
                raise CheckpointError(f"{path}: mask '{name}' shape attribute disagrees with its data (corrupted file)")
            if "ratio" not in ds.attrs:
                raise CheckpointError(f"{path}: mask '{name}' has no ratio attribute (incomplete file)")
            masks[name] = torch.from_numpy(np.ascontiguousarray(data))
            ratios[name] = float(ds.attrs["ratio"])
            shapes[name] = shape
            numel = max(1, data.size)
            if abs(ratios[name] - float((~data).sum()) / numel) > 0.5 / numel:
                raise CheckpointError(f"{path}: ratio attribute of mask '{name}' disagrees with its data (corrupted file)")
        extra = {k: (v.item() if isinstance(v, np.generic) else _str(v) if isinstance(v, bytes) else v)
                 for k, v in fh["extra"].attrs.items()} if "extra" in fh else {}
    return MaskFile(model_name, method, seed, sparsity, ratios, masks, shapes, achieved, version, extra)


def _fmt_shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_mask_file(mf: MaskFile, path: str, model: nn.Module | None = None, model_name: str | None = None) -> None:
    """Raise a one-line CheckpointError if ``mf`` does not fit ``model`` / ``model_name``."""
    if model_name is not None and mf.model_name != model_name:
        raise CheckpointError(f"{path}: mask file is for model '{mf.model_name}', not '{model_name}'")
    if model is None:
        return
    want = maskable_shapes(model)
    for name, shape in want.items():
        if name not in mf.masks:
            raise CheckpointError(f"{path}: no mask for parameter '{name}' of the model (file is for model '{mf.model_name}')")
        if tuple(mf.shapes[name]) != tuple(shape):
            raise CheckpointError(f"{path}: mask '{name}' has shape {_fmt_shape(mf.shapes[name])}, "
                                  f"the model's parameter has {_fmt_shape(shape)}")
    for name in mf.masks:
        if name not in want:
            raise CheckpointError(f"{path}: mask for '{name}', which is not a conv/linear weight of the model")


def read_mask_file(path: str, model: nn.Module | None = None, model_name: str | None = None) -> MaskFile:
    """Read and verify a mask file; with ``model``/``model_name``, also check it fits.

    Every problem (missing, not HDF5, not a mask file, truncated, corrupted, for another
    model) is a :class:`~zohpc.errors.CheckpointError` with one line naming the file.
    """
    path = os.fspath(path)
    try:
        mf = _read(path, maskable_shapes(model) if model is not None else None)
    except CheckpointError:
        raise
    except Exception as exc:  # h5py/OSError/KeyError/ValueError on damaged content
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: unreadable or corrupted mask file ({msg})") from None
    check_mask_file(mf, path, model, model_name)
    return mf


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "MaskFile", "MaskSchedule", "check_mask_file", "global_sparsity", "layer_ratios",
    "layerwise_random_masks", "mask_draw", "maskable_names", "maskable_shapes",
    "masks_from_scores", "read_mask_file", "write_mask_file",
]
