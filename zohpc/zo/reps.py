"""How a perturbed value travels through a query: the three representations ("reps").

For Q stacked copies of one node's value:

* :class:`Chan`: the cached tensor with one block of channels (dim 1) replaced per copy
  (block ``idx[q]``, ``s`` channels wide); ``v`` holds the blocks, (Q*B, s, ...).
* :class:`Full`: all values changed; the copies stacked along dim 0, (Q*B, ...).
* :class:`Per`: a list of Q values, for ops the engine does not know (run copy by copy).

A node absent from a query's reps is unchanged (its cached value serves every copy). The
rules (zohpc.zo.rules) reason on the abstract kinds :func:`kind_of` returns: None,
``("chan", s, shift)``, ``"full"`` or ``"per"``.
"""

from __future__ import annotations

FULL = "full"
PER = "per"


def chan(s: int, shift: int = 0) -> tuple:
    """A one-block kind: blocks ``s`` channels wide, indices shifted by ``shift`` (pad) from the source's."""
    return ("chan", int(s), int(shift))


def is_chan(kind) -> bool:
    return isinstance(kind, tuple)


class Chan:
    """Cached tensor with block ``idx[q]`` (channels idx*s .. idx*s+s-1 of dim 1) replaced."""

    __slots__ = ("idx", "s", "v", "idx_t", "own")

    def __init__(self, idx, s, v, idx_t=None, own=False):
        self.idx, self.s, self.v, self.idx_t, self.own = list(idx), int(s), v, idx_t, own


class Full:
    """Q copies stacked along dim 0. ``own``: the tensor is ours alone (may be updated in place)."""

    __slots__ = ("t", "own")

    def __init__(self, t, own=False):
        self.t, self.own = t, own


class Per:
    """One value per copy (any type)."""

    __slots__ = ("vals",)

    def __init__(self, vals):
        self.vals = vals


def tensor_of(rep):
    """The tensor a Chan or Full rep holds (None for others)."""
    if isinstance(rep, Chan):
        return rep.v
    return rep.t if isinstance(rep, Full) else None


__all__ = ["FULL", "PER", "Chan", "Full", "Per", "chan", "is_chan", "tensor_of"]
