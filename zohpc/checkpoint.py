"""HDF5 checkpoints: a pickle-free tree format, atomic writes, full verification, resume.

Why not ``torch.save``: it pickles, so loading a file can run code, and a flipped byte
goes unnoticed. Here every array is a dataset with fletcher32 + SHA-256 (``h5util``), and
everything that is not an array (dict keys and their types, list/tuple shapes, Python
scalars, dtypes and shapes of the arrays) lives in one checksummed JSON "structure"
dataset per tree. A damaged file therefore either fails to load with a one-line
:class:`~zohpc.errors.CheckpointError` or loads exactly what was saved.

File layout (format ``zohpc-checkpoint``, version 1)::

    /                 attrs: format, format_version, complete, zohpc_version, step, epoch, config
    /meta             JSON text: the same values, checksummed (the attrs are for humans)
    /params/ /buffers/ /masks/ /optimizer/ /scheduler/ /rng/ /extra/
                      trees: ``__tree__`` (JSON structure) + one dataset per tensor/array,
                      named after its place in the tree (e.g. ``params/conv1.weight``)
    /metrics/records  JSON text: the list of metric records so far
    trailer           79 bytes after the HDF5 data: ``\nzohpc-sha256:<64 hex>\n``, the SHA-256
                      of every byte before it (HDF5 ignores bytes past its end of file)

Why the trailer: the HDF5 library can crash the process (segfault) on some damaged
metadata, so no byte of a checkpoint reaches it before the whole file is verified.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from typing import Callable

import h5py
import numpy as np
import torch

from ._version import __version__
from .errors import CheckpointError
from .h5tree import (  # noqa: F401 - the tree format is part of this module's interface
    TREE_DATASET, _torch_dtype_name, read_json, read_tree, write_json, write_tree,
)
from .h5util import (  # noqa: F401 - trailer names re-exported for users of this module
    TRAILER_PREFIX, TRAILER_SIZE, append_trailer, atomic_h5, open_verified, read_array, verify_trailer, write_array,
)

FORMAT_NAME = "zohpc-checkpoint"
FORMAT_VERSION = 1

_TREE_GROUPS = ("params", "buffers", "masks", "optimizer", "scheduler", "rng", "extra")
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})(?:-([0-9a-f]{12}))?\.h5$")


# --------------------------------------------------------------------------- checkpoints
@dataclasses.dataclass
class Checkpoint:
    """Everything one checkpoint holds; tensors are on the CPU."""

    step: int
    epoch: int
    config_toml: str
    params: dict
    buffers: dict
    masks: dict
    optimizer: dict
    scheduler: dict
    rng: dict
    metrics: list
    extra: dict
    path: str = ""
    format_version: int = FORMAT_VERSION
    zohpc_version: str = ""


@dataclasses.dataclass
class Expect:
    """What a checkpoint of this model must hold, from the model and the config: the names,
    shapes and dtypes of the trained parameters and the buffers, the maskable weights, the
    steps per epoch and the size of the RNG state. With it, :func:`load_checkpoint` refuses a
    file that does not fit before reading its arrays, and validates every restored field."""

    params: dict  # name -> (shape tuple, torch.dtype)
    buffers: dict  # name -> (shape tuple, torch.dtype)
    masks: dict  # maskable weight name -> shape tuple
    steps_per_epoch: int
    rng_bytes: int

    @classmethod
    def of(cls, model, steps_per_epoch: int) -> "Expect":
        from .masks import maskable_shapes

        return cls(params={n: (tuple(p.shape), p.dtype) for n, p in model.named_parameters() if p.requires_grad},
                   buffers={n: (tuple(b.shape), b.dtype) for n, b in model.named_buffers()},
                   masks=maskable_shapes(model), steps_per_epoch=int(steps_per_epoch),
                   rng_bytes=int(torch.get_rng_state().numel()))


def _fail(path: str, field: str, problem: str):
    raise CheckpointError(f"{path}: field {field}: {problem}")


def _precheck_tensors(doc, wanted: dict, group: str, path: str, subset: bool = False) -> None:
    """Compare a tensor dict's declared names, shapes and dtypes with ``wanted`` (name ->
    (shape, dtype) or shape for bool masks) before any of its arrays is read."""
    root = doc.get("root") if isinstance(doc, dict) else None
    if not isinstance(root, dict) or root.get("t") != "dict" or not isinstance(root.get("items"), list):
        _fail(path, group, "expected a dict of named tensors")
    seen = set()
    for item in root["items"]:
        if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], dict) and isinstance(item[1], dict)):
            _fail(path, group, "malformed entry")
        key, node = item
        name = key.get("v") if key.get("t") == "str" else None
        if not isinstance(name, str):
            _fail(path, group, "a key is not a name")
        if name not in wanted:
            _fail(path, f"{group}.{name}", "not in this model (the checkpoint is for another model)")
        want = wanted[name]
        shape, dtype = (want, torch.bool) if not (isinstance(want, tuple) and len(want) == 2
                                                   and isinstance(want[1], torch.dtype)) else want
        if node.get("t") != "tensor" or node.get("shape") != list(shape) \
                or node.get("dtype") != _torch_dtype_name(dtype):
            _fail(path, f"{group}.{name}", f"declares {node.get('dtype')} {node.get('shape')}, the model needs "
                  f"{_torch_dtype_name(dtype)} {list(shape)}")
        seen.add(name)
    if not subset and seen != set(wanted):
        missing = sorted(set(wanted) - seen)
        _fail(path, group, f"missing {', '.join(missing[:4])} (the checkpoint is for another model)")


def _is_int(v) -> bool:
    return type(v) is int


def _is_number(v) -> bool:
    return type(v) in (int, float) and v == v and abs(v) != float("inf")


def validate(state: "Checkpoint", expect: Expect) -> None:
    """Every field the Trainer restores, checked against ``expect``: one CheckpointError line
    naming the file and the field (nothing is restored from a file that fails)."""
    path, extra = state.path, state.extra
    spe = expect.steps_per_epoch
    if not _is_int(state.step) or state.step < 0:
        _fail(path, "step", f"{state.step!r} is not a step (a non-negative integer)")
    if not _is_int(state.epoch) or state.epoch < 0:
        _fail(path, "epoch", f"{state.epoch!r} is not an epoch (a non-negative integer)")
    bie = extra.get("batch_in_epoch", 0)
    if not _is_int(bie) or not 0 <= bie <= spe:
        _fail(path, "extra.batch_in_epoch", f"{bie!r} is not in 0..{spe}")
    if state.step != state.epoch * spe + bie:
        _fail(path, "step", f"{state.step} does not match epoch {state.epoch} x {spe} steps + {bie} "
              f"(another data size or batch size, or a crafted file)")
    if set(state.rng) != {"torch"}:
        _fail(path, "rng", f"holds {sorted(map(str, state.rng))}, expected ['torch']")
    rng = state.rng["torch"]
    if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or tuple(rng.shape) != (expect.rng_bytes,):
        _fail(path, "rng.torch", f"expected a uint8 tensor of {expect.rng_bytes} bytes")
    try:
        torch.Generator().set_state(rng)
    except (RuntimeError, ValueError) as exc:
        _fail(path, "rng.torch", f"not a valid generator state ({str(exc).splitlines()[0]})")
    costs = extra.get("costs", [])
    if not isinstance(costs, list) or not all(_is_number(c) and c >= 0 for c in costs):
        _fail(path, "extra.costs", "expected a list of non-negative numbers")
    ratios = extra.get("mask_ratios")
    if ratios is not None and (not isinstance(ratios, dict) or not all(
            isinstance(k, str) and k in expect.masks and _is_number(v) and 0 <= v <= 1 for k, v in ratios.items())):
        _fail(path, "extra.mask_ratios", "expected maskable weights of the model mapped to ratios in [0, 1]")
    for key, kind in (("mask_source", str), ("run_id", str), ("frozen_sha256", str), ("mask_fixed", bool)):
        if key in extra and type(extra[key]) is not kind:
            _fail(path, f"extra.{key}", f"expected a {kind.__name__}, found {type(extra[key]).__name__}")
    lrs = state.scheduler.get("base_lrs")
    if not isinstance(lrs, list) or not all(_is_number(v) for v in lrs):
        _fail(path, "scheduler.base_lrs", "expected a list of numbers")


def _check_tensor_dict(name: str, d) -> None:
    if not isinstance(d, dict):
        raise TypeError(f"save_checkpoint: {name} must be a dict of tensors, got {type(d).__name__}")
    for key, value in d.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise TypeError(f"save_checkpoint: {name} must map str to torch.Tensor (bad entry {key!r})")


def save_checkpoint(path: str, *, step: int, epoch: int, config_toml: str, params: dict, buffers: dict,
                    masks: dict, optimizer: dict, scheduler: dict, rng: dict, metrics: list,
                    extra: dict | None = None) -> str:
    """Write a checkpoint atomically (temporary name, fsync, rename); return ``path``.

    Programming mistakes (unsupported types) raise TypeError; an unwritable location
    raises CheckpointError naming the path.
    """
    for name, d in (("params", params), ("buffers", buffers), ("masks", masks)):
        _check_tensor_dict(name, d)
    extra = {} if extra is None else extra
    meta = {"zohpc_version": __version__, "step": int(step), "epoch": int(epoch), "config": str(config_toml)}
    try:
        metrics_text = json.dumps(list(metrics), ensure_ascii=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise TypeError(f"save_checkpoint: metrics must be JSON-serialisable records ({exc})") from None
    path = os.fspath(path)
    try:
        with atomic_h5(path, FORMAT_NAME, FORMAT_VERSION, in_memory=True) as fh:
            fh.attrs["zohpc_version"] = meta["zohpc_version"]
            fh.attrs["step"] = meta["step"]
            fh.attrs["epoch"] = meta["epoch"]
            fh.attrs["config"] = meta["config"]
            write_json(fh, "meta", meta)
            for name, tree in (("params", params), ("buffers", buffers), ("masks", masks),
                               ("optimizer", optimizer), ("scheduler", scheduler), ("rng", rng),
                               ("extra", extra)):
                write_tree(fh.create_group(name), tree)
            write_array(fh.create_group("metrics"), "records", np.bytes_(metrics_text.encode("ascii")))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot write checkpoint ({exc})") from None
    return path


# --------------------------------------------------------------------------- the Trainer's state
def to_file(state: dict) -> dict:
    """The Trainer's state, composed of its components' state dicts (position, model, masks,
    optimizer, scheduler, rng, estimator, metrics, run), mapped onto the groups of the file
    (the keyword arguments of :func:`save_checkpoint`; the layout of format version 1)."""
    pos, model, masks = state["position"], state["model"], state["masks"]
    return dict(step=pos["step"], epoch=pos["epoch"], config_toml=state["config_toml"],
                params=model["params"], buffers=model["buffers"], masks=masks["masks"],
                optimizer=state["optimizer"], scheduler=state["scheduler"], rng=state["rng"],
                metrics=state["metrics"],
                extra={"batch_in_epoch": pos["batch_in_epoch"], "costs": list(state["estimator"].get("costs") or []),
                       "mask_ratios": masks["ratios"], "mask_source": masks["source"], "mask_fixed": masks["fixed"],
                       "run_id": state["run"]["run_id"], "frozen_sha256": model["frozen_sha256"]})


def from_file(ck: Checkpoint) -> dict:
    """The inverse of :func:`to_file`: a loaded (and validated) checkpoint as the Trainer's
    composed state. Fields that older checkpoints lack get the values those runs had."""
    extra = ck.extra
    return {"position": {"step": ck.step, "epoch": ck.epoch, "batch_in_epoch": int(extra.get("batch_in_epoch", 0))},
            "config_toml": ck.config_toml,
            "model": {"params": ck.params, "buffers": ck.buffers,
                      "frozen_sha256": str(extra.get("frozen_sha256", ""))},
            "masks": {"masks": ck.masks, "ratios": extra.get("mask_ratios"),
                      "source": extra.get("mask_source", "checkpoint"), "fixed": extra.get("mask_fixed", True)},
            "optimizer": ck.optimizer, "scheduler": ck.scheduler, "rng": ck.rng,
            "estimator": {"costs": list(extra.get("costs") or [])}, "metrics": ck.metrics,
            "run": {"run_id": str(extra.get("run_id", ""))}, "path": ck.path}


def _attr_matches(fh, key: str, expected) -> bool:
    if key not in fh.attrs:
        return False
    value = fh.attrs[key]
    if isinstance(value, bytes):
        value = value.decode()
    if isinstance(expected, str):
        return isinstance(value, str) and value == expected
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)) and int(value) == expected


def _load(path: str, expect: Expect | None = None) -> Checkpoint:
    fh = open_verified(path, FORMAT_NAME, FORMAT_VERSION)
    with fh:
        version = int(fh.attrs["format_version"])
        for group in (*_TREE_GROUPS, "metrics"):
            if group not in fh or not isinstance(fh[group], h5py.Group):
                raise CheckpointError(f"{path}: group '{group}/' missing (incomplete or foreign file)")
        meta = read_json(fh, "meta", path)
        if not isinstance(meta, dict) or type(meta.get("step")) is not int or type(meta.get("epoch")) is not int \
                or not isinstance(meta.get("config"), str) or not isinstance(meta.get("zohpc_version"), str):
            raise CheckpointError(f"{path}:/meta: malformed metadata")
        for key in ("step", "epoch", "config", "zohpc_version"):
            if not _attr_matches(fh, key, meta[key]):
                raise CheckpointError(f"{path}: root attribute '{key}' disagrees with the checksummed metadata (corrupted file)")
        if expect is not None:  # names, shapes and dtypes against the model before any array is read
            for name, wanted, subset in (("params", expect.params, False), ("buffers", expect.buffers, False),
                                         ("masks", expect.masks, True)):
                _precheck_tensors(read_json(fh[name], TREE_DATASET, path), wanted, name, path, subset)
        trees = {name: read_tree(fh[name], path) for name in _TREE_GROUPS}
        metrics = read_json(fh["metrics"], "records", path)
    if not isinstance(metrics, list) or not all(isinstance(r, dict) for r in metrics):
        raise CheckpointError(f"{path}:/metrics/records: expected a list of records")
    for name in ("params", "buffers", "masks"):
        d = trees[name]
        if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items()):
            raise CheckpointError(f"{path}:/{name}: expected a dict of named tensors")
    for name in ("optimizer", "scheduler", "rng", "extra"):
        if not isinstance(trees[name], dict):
            raise CheckpointError(f"{path}:/{name}: expected a dict")
    state = Checkpoint(step=meta["step"], epoch=meta["epoch"], config_toml=meta["config"], metrics=metrics,
                       path=path, format_version=version, zohpc_version=meta["zohpc_version"], **trees)
    if expect is not None:
        validate(state, expect)
    return state


def load_checkpoint(path: str, expect: Expect | None = None) -> Checkpoint:
    """Load and fully verify a checkpoint; any problem is one CheckpointError line naming ``path``.

    Links of any kind and datasets that declare more than the file holds are refused before
    they are followed or read. With ``expect`` (:class:`Expect`), the arrays must also fit the
    model (checked before reading them) and every restored field is validated."""
    path = os.fspath(path)
    try:
        return _load(path, expect)
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{path}: corrupted file (a dataset claims an impossible size)") from None
    except Exception as exc:  # noqa: BLE001 - damaged bytes surface as many h5py/numpy/json types
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path}: corrupted or unreadable checkpoint ({type(exc).__name__}: {msg})") from None


def verify_checkpoint(path: str) -> None:
    """Raise CheckpointError unless ``path`` loads completely (e.g. right after writing it)."""
    load_checkpoint(path)


# --------------------------------------------------------------------------- run directories
def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.fspath(run_dir), "checkpoints")


def checkpoint_path(run_dir: str, step: int, run_id: str | None = None) -> str:
    """``checkpoints/ckpt-<step>-<run id>.h5``: the run id marks which run a file belongs to."""
    suffix = f"-{run_id}" if run_id else ""
    return os.path.join(checkpoint_dir(run_dir), f"ckpt-{int(step):08d}{suffix}.h5")


def checkpoint_step(path: str) -> int | None:
    """The step in a checkpoint file name, or None for any other name (temporaries included)."""
    m = _CKPT_RE.match(os.path.basename(os.fspath(path)))
    return int(m.group(1)) if m else None


def checkpoint_run_id(path: str) -> str | None:
    """The run id in a checkpoint file name (None for names without one)."""
    m = _CKPT_RE.match(os.path.basename(os.fspath(path)))
    return m.group(2) if m else None


def list_checkpoints(run_dir: str) -> list[str]:
    """Checkpoint files of a run, newest (highest step) first; temporaries never appear."""
    directory = checkpoint_dir(run_dir)
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for name in names:
        step = checkpoint_step(name)
        full = os.path.join(directory, name)
        if step is not None and os.path.isfile(full):
            found.append((step, full))
    found.sort(key=lambda item: item[0], reverse=True)
    return [full for _, full in found]


def _default_warn(message: str) -> None:
    print(f"zohpc: warning: {message}", file=sys.stderr, flush=True)


def _reason(exc: CheckpointError, path: str) -> str:
    text = str(exc)
    return text[len(path) + 2:] if text.startswith(path + ": ") else text


def find_resumable(run_dir: str, warn: Callable[[str], None] | None = None) -> tuple[str, Checkpoint] | None:
    """The newest checkpoint of ``run_dir`` that verifies, warning about each one skipped."""
    warn = warn or _default_warn
    for path in list_checkpoints(run_dir):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as exc:
            warn(f"checkpoint {path}: {_reason(exc, path)}; skipping")
    return None


def prune_checkpoints(run_dir: str, keep: int, run_id: str) -> list[str]:
    """Delete all but the newest ``keep`` checkpoints of the run ``run_id`` (by step); return
    the removed paths. Files of other runs, or without a run id in their name, are never touched."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    if not run_id:
        raise ValueError("prune_checkpoints needs the run id of the checkpoints it may delete")
    removed = []
    ours = [p for p in list_checkpoints(run_dir) if checkpoint_run_id(p) == run_id]
    for path in ours[keep:]:
        try:
            os.remove(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed


def resolve_resume(spec: str | None, run_dir: str, warn: Callable[[str], None] | None = None
                   ) -> tuple[str, Checkpoint] | None:
    """Interpret ``--resume``: None/'' -> None (fresh start); 'auto' -> newest good checkpoint of
    ``run_dir`` or None; a directory -> its newest good checkpoint (error if none); a file ->
    that checkpoint (CheckpointError if it does not verify)."""
    if not spec:
        return None
    if spec == "auto":
        return find_resumable(run_dir, warn)
    if os.path.isdir(spec):
        found = find_resumable(spec, warn)
        if found is None:
            raise CheckpointError(f"--resume {spec}: no usable checkpoint in {checkpoint_dir(spec)}")
        return found
    if not os.path.exists(spec):
        raise CheckpointError(f"--resume {spec}: no such file")
    return spec, load_checkpoint(spec)


__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "Checkpoint", "Expect", "validate", "to_file", "from_file", "write_tree", "read_tree", "write_json", "read_json",
    "save_checkpoint", "load_checkpoint", "verify_checkpoint", "checkpoint_dir", "checkpoint_path",
    "checkpoint_step", "checkpoint_run_id", "list_checkpoints", "find_resumable", "prune_checkpoints", "resolve_resume",
]
