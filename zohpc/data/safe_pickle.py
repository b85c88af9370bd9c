"""Reading CIFAR-10's python batches (pickles) without letting a hostile file run code.

:class:`RestrictedUnpickler` admits only the handful of numpy callables an ``ndarray`` needs
and never imports or calls anything else.
"""

from __future__ import annotations

import pickle
import struct

import numpy as np

from ..errors import DataError, one_line


def _safe_latin1_encode(obj, encoding="latin1", errors="strict"):
    """Stand-in for ``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it: latin-1 only."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise pickle.UnpicklingError("_codecs.encode is admitted only for latin-1 strings")
    return obj.encode("latin-1", errors="strict")


def _frombuffer(buf, dtype, shape, order="C"):
    """Stand-in for numpy's private ``_frombuffer`` (pickle protocol 5), rebuilt from public API."""
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


_NP_RECONSTRUCT = np.ndarray.__reduce__(np.zeros(1))[0]  # numpy's _reconstruct, whatever its module


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can rebuild numpy arrays, dicts, lists, strings and numbers, nothing else.

    ``find_class`` maps an exact allow-list of ``(module, name)`` pairs to objects taken
    from the already-imported numpy; it never imports a module, so a pickle naming
    ``os.system``, ``builtins.eval`` or anything else fails before any of it can run.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
        ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
        ("numpy.core.numeric", "_frombuffer"): _frombuffer,
        ("numpy._core.numeric", "_frombuffer"): _frombuffer,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _safe_latin1_encode,
    }

    def find_class(self, module, name):
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id")


def restricted_load(path: str):
    """Unpickle ``path`` with :class:`RestrictedUnpickler` (bytes keys, as Python 2 wrote them)."""
    try:
        with open(path, "rb") as fh:
            return RestrictedUnpickler(fh, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: missing file") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError,
            KeyError, struct.error, OverflowError, MemoryError, UnicodeError) as exc:
        raise DataError(f"{path}: not a safe CIFAR-10 python batch ({one_line(exc) or type(exc).__name__})") from None
