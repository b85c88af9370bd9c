"""Pickle-free trees in HDF5: nested dicts, lists and tuples of tensors, arrays and Python
scalars, stored as one dataset per array plus one checksummed JSON "structure" dataset
(``__tree__``) per group. Used by checkpoints (``zohpc.checkpoint``); nothing read back is
ever evaluated, and every dataset's declared size is checked before it is read.
"""

from __future__ import annotations

import json
import struct

import h5py
import numpy as np
import torch

from .errors import CheckpointError
from .h5util import check_declared_size, read_array, write_array

TREE_DATASET = "__tree__"


# --------------------------------------------------------------------------- JSON text
def write_json(group: h5py.Group, name: str, obj) -> None:
    """Store ``obj`` as checksummed JSON text (a fixed-length byte string dataset).

    ``json.loads(group[name][()])`` reads it back with plain h5py; nothing is evaluated.
    """
    text = json.dumps(obj, ensure_ascii=True, separators=(",", ":"))
    write_array(group, name, np.bytes_(text.encode("ascii")))


def read_json(group: h5py.Group, name: str, path: str = ""):
    _check_size(group, name, path)
    raw = read_array(group, name, path)
    if raw.dtype.kind != "S" or raw.ndim != 0:
        raise CheckpointError(f"{path}:{group.name.rstrip('/')}/{name}: expected JSON text, found {raw.dtype} {raw.shape}")
    return json.loads(raw[()].decode("ascii"))


def _check_size(group: h5py.Group, name: str, path: str) -> None:
    """Refuse a missing dataset, or one that declares more than the file holds, before reading it."""
    if name not in group:
        raise CheckpointError(f"{path}:{group.name.rstrip('/')}/{name}: dataset missing (incomplete file)")
    ds = group[name]
    if not isinstance(ds, h5py.Dataset):
        raise CheckpointError(f"{path}:{group.name.rstrip('/')}/{name}: not a dataset")
    check_declared_size(ds, f"{path}:{ds.name}", path)


# --------------------------------------------------------------------------- trees
def _float_bits(x: float) -> str:
    return struct.pack("<d", x).hex()


def _bits_float(s: str) -> float:
    return struct.unpack("<d", bytes.fromhex(s))[0]


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


# torch dtypes with no numpy twin are stored as raw integers of the same width
_RAW_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _tensor_to_numpy(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    if t.layout != torch.strided:
        raise TypeError(f"cannot store a {t.layout} tensor; convert it to dense first")
    t = t.detach().to("cpu").contiguous()
    if t.is_conj():
        t = t.resolve_conj()
    if t.is_neg():
        t = t.resolve_neg()
    try:
        return t.numpy(), False
    except TypeError:  # bfloat16, float8 ...: keep the bits
        return t.view(_RAW_VIEW[t.element_size()]).numpy(), True


class _Writer:
    def __init__(self, group: h5py.Group):
        self.group = group
        self.used = {TREE_DATASET}

    def _name(self, where: str) -> str:
        base = (where or "value").replace("/", "%2F")
        if base.startswith("."):
            base = "_" + base
        name, n = base, 1
        while name in self.used:
            n += 1
            name = f"{base}#{n}"
        self.used.add(name)
        return name

    def encode(self, obj, where: str):
        if obj is None:
            return {"t": "none"}
        if isinstance(obj, bool):
            return {"t": "bool", "v": obj}
        if isinstance(obj, int) and type(obj) is int:
            return {"t": "int", "v": obj}
        if type(obj) is float:
            return {"t": "float", "bits": _float_bits(obj)}
        if type(obj) is str:
            return {"t": "str", "v": obj}
        if type(obj) is bytes:
            return {"t": "bytes", "hex": obj.hex()}
        if isinstance(obj, torch.Tensor):
            array, raw = _tensor_to_numpy(obj)
            name = self._name(where)
            write_array(self.group, name, array)
            return {"t": "tensor", "dtype": _torch_dtype_name(obj.dtype), "shape": list(obj.shape),
                    "raw": raw, "ds": name}
        if isinstance(obj, np.generic):
            if obj.dtype.kind == "O":
                raise TypeError(f"cannot store numpy object scalar at {where!r}")
            return {"t": "npscalar", "dtype": obj.dtype.str, "hex": obj.tobytes().hex()}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind in "OVUMm" or obj.dtype.fields is not None:
                raise TypeError(f"cannot store numpy array of dtype {obj.dtype} at {where!r}")
            name = self._name(where)
            write_array(self.group, name, np.ascontiguousarray(obj))
            return {"t": "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape), "ds": name}
        if isinstance(obj, dict):  # OrderedDict comes back as a plain dict (same order)
            items = []
            for key, value in obj.items():
                key_node = self._key(key, where)
                sub = f"{where}.{key}" if where else str(key)
                items.append([key_node, self.encode(value, sub)])
            return {"t": "dict", "items": items}
        if type(obj) is list:
            return {"t": "list", "items": [self.encode(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]}
        if type(obj) is tuple or isinstance(obj, torch.Size):
            return {"t": "tuple", "items": [self.encode(v, f"{where}.{i}" if where else str(i)) for i, v in enumerate(obj)]}
        raise TypeError(f"cannot store {type(obj).__name__} at {where or 'the root'!r} in a checkpoint "
                        "(supported: dict, list, tuple, tensor, ndarray, int, float, bool, None, str, bytes)")

    def _key(self, key, where: str):
        if isinstance(key, (str, int, float, bytes)) or key is None or isinstance(key, tuple):
            node = self.encode(key, "")
            if node["t"] in ("tensor", "ndarray"):  # pragma: no cover - excluded above
                raise TypeError("tensor dict keys are not supported")
            return node
        raise TypeError(f"cannot store dict key {key!r} ({type(key).__name__}) at {where or 'the root'!r}")


def write_tree(group: h5py.Group, obj) -> None:
    """Store a nested dict/list/tuple of tensors, arrays and Python scalars in ``group``.

    Key types, container types, scalar values (floats bit-exact) and tensor dtypes/shapes
    are kept exactly; tensors come back on the CPU.
    """
    writer = _Writer(group)
    structure = writer.encode(obj, "")
    write_json(group, TREE_DATASET, {"tree": 1, "root": structure})


class _Reader:
    def __init__(self, group: h5py.Group, path: str):
        self.group = group
        self.path = path

    def _fail(self, msg: str):
        raise CheckpointError(f"{self.path}:{self.group.name}: {msg}")

    def _dataset(self, node, np_dtype: np.dtype, shape: tuple) -> np.ndarray:
        name = node["ds"]
        if not isinstance(name, str) or name not in self.group:
            self._fail(f"dataset {name!r} missing (incomplete file)")
        ds = self.group[name]
        if not isinstance(ds, h5py.Dataset):
            self._fail(f"{name!r} is not a dataset")
        stored_dtype = np.dtype(np.uint8) if np_dtype == np.bool_ else np_dtype
        if tuple(ds.shape or ()) != shape or ds.dtype != stored_dtype:
            self._fail(f"dataset {name!r} has shape {ds.shape} dtype {ds.dtype}, expected {shape} {np_dtype} (corrupted)")
        data = read_array(self.group, name, self.path)
        if data.dtype != np_dtype or data.shape != shape:
            self._fail(f"dataset {name!r} read back as {data.dtype} {data.shape}, expected {np_dtype} {shape} (corrupted)")
        return data

    def decode(self, node):
        if not isinstance(node, dict):
            self._fail("malformed structure")
        t = node["t"]
        if t == "none":
            return None
        if t == "bool":
            return _exact(node["v"], bool)
        if t == "int":
            return _exact(node["v"], int)
        if t == "float":
            return _bits_float(_exact(node["bits"], str))
        if t == "str":
            return _exact(node["v"], str)
        if t == "bytes":
            return bytes.fromhex(_exact(node["hex"], str))
        if t == "tensor":
            dtype = _torch_dtype(node["dtype"])
            shape = tuple(_exact(d, int) for d in node["shape"])
            if node["raw"]:
                raw_dtype = _RAW_VIEW[torch.empty(0, dtype=dtype).element_size()]
                data = self._dataset(node, torch.empty(0, dtype=raw_dtype).numpy().dtype, shape)
                return torch.from_numpy(data.copy()).view(dtype)
            np_dtype = torch.empty(0, dtype=dtype).numpy().dtype
            return torch.from_numpy(self._dataset(node, np_dtype, shape).copy())
        if t == "ndarray":
            shape = tuple(_exact(d, int) for d in node["shape"])
            return self._dataset(node, np.dtype(node["dtype"]), shape).copy()
        if t == "npscalar":
            dtype = np.dtype(node["dtype"])
            raw = bytes.fromhex(node["hex"])
            if len(raw) != dtype.itemsize:
                self._fail("malformed numpy scalar")
            return np.frombuffer(raw, dtype=dtype)[0]
        if t == "dict":
            out = {}
            for key_node, value_node in node["items"]:
                key = self.decode(key_node)
                if key in out:
                    self._fail(f"duplicate key {key!r}")
                out[key] = self.decode(value_node)
            return out
        if t == "list":
            return [self.decode(v) for v in node["items"]]
        if t == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        self._fail(f"unknown node type {t!r}")


def _exact(value, tp):
    if type(value) is not tp:
        raise ValueError(f"expected {tp.__name__}, got {type(value).__name__}")
    return value


def read_tree(group: h5py.Group, path: str = ""):
    """Read a tree written by :func:`write_tree`, verifying every checksum, dtype and shape."""
    where = f"{path}:{group.name}"
    doc = read_json(group, TREE_DATASET, path)
    if not isinstance(doc, dict) or doc.get("tree") != 1 or "root" not in doc:
        raise CheckpointError(f"{where}: malformed tree structure")
    try:
        return _Reader(group, path).decode(doc["root"])
    except CheckpointError:
        raise
    except (KeyError, ValueError, TypeError, IndexError, AttributeError, struct.error) as exc:
        raise CheckpointError(f"{where}: malformed tree structure ({type(exc).__name__}: {exc})") from None
