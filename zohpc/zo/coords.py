"""The global order of active coordinates: what CGE queries, what ranks shard, what gets gathered.

Coordinates are the scalar entries of every parameter tensor, in ``model.named_parameters()``
order, flat (row-major) index ascending within a tensor. A mask (bool tensor shaped like the
parameter) removes entries; unmasked parameters are fully active. The order is a pure function
of the model and the masks, so every MPI rank derives the same one without communication.

Frozen parameters (``requires_grad=False``: the base weights under LoRA adapters) keep their
place in the order with no active entry, whatever a mask says: no estimator queries them,
``scatter`` gives them zeros and ``fill_grad`` leaves their ``grad`` None, so no optimizer
touches them.
"""

from __future__ import annotations

import bisect

import torch
import torch.nn as nn

from ..errors import ConfigError


class Coordinates:
    """Active coordinates of ``model`` under optional ``masks`` (param name -> bool tensor).

    DeepZero's protocol masks conv/linear weights only; biases and BatchNorm parameters are
    then fully active. Any parameter named in ``masks`` is masked as given.
    """

    def __init__(self, model: nn.Module, masks: dict | None = None):
        named = list(model.named_parameters())
        masks = dict(masks or {})
        known = {name for name, _ in named}
        for name in masks:
            if name not in known:
                raise ConfigError(f"mask for unknown parameter {name!r} (not in the model)")
        self.param_names: list[str] = []
        self.shapes: list[torch.Size] = []
        self.numels: list[int] = []
        self.counts: list[int] = []
        self._indices: list[torch.Tensor | None] = []  # None: dense (all flat indices)
        for name, p in named:
            self.param_names.append(name)
            self.shapes.append(p.shape)
            self.numels.append(p.numel())
            if not p.requires_grad:
                self._indices.append(torch.zeros(0, dtype=torch.long))
                self.counts.append(0)
                continue
            m = masks.get(name)
            if m is None:
                self._indices.append(None)
                self.counts.append(p.numel())
                continue
            m = torch.as_tensor(m)
            if tuple(m.shape) != tuple(p.shape):
                raise ConfigError(f"mask for parameter {name!r} has shape {tuple(m.shape)}, "
                                  f"expected {tuple(p.shape)}")
            idx = torch.nonzero(m.reshape(-1).to(device="cpu", dtype=torch.bool)).reshape(-1)
            self._indices.append(idx)
            self.counts.append(int(idx.numel()))
        self.offsets: list[int] = [0]
        for c in self.counts:
            self.offsets.append(self.offsets[-1] + c)
        self.total: int = self.offsets[-1]

    def __len__(self) -> int:
        return self.total

    def indices(self, param_index: int) -> torch.Tensor:
        """Ascending flat indices (CPU LongTensor) of the active entries of one parameter."""
        idx = self._indices[param_index]
        return torch.arange(self.numels[param_index]) if idx is None else idx

    def runs(self, start: int = 0, stop: int | None = None) -> list[tuple[int, torch.Tensor]]:
        """(param_index, flat indices) pieces covering global positions [start, stop), in order."""
        stop = self.total if stop is None else stop
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"coordinate range [{start}, {stop}) outside [0, {self.total})")
        out = []
        pi = bisect.bisect_right(self.offsets, start) - 1
        pos = start
        while pos < stop and pi < len(self.counts):
            lo, hi = self.offsets[pi], self.offsets[pi + 1]
            if hi > pos:
                a, b = pos - lo, min(stop, hi) - lo
                idx = self._indices[pi]
                flat = torch.arange(a, b) if idx is None else idx[a:b]
                out.append((pi, flat))
                pos = lo + b
            pi += 1
        return out

    def scatter(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Tensors shaped like the parameters holding ``values`` (length total); zeros elsewhere."""
        values = torch.as_tensor(values).reshape(-1)
        if values.numel() != self.total:
            raise ValueError(f"expected {self.total} values, got {values.numel()}")
        out = []
        for pi, shape in enumerate(self.shapes):
            piece = values[self.offsets[pi]:self.offsets[pi + 1]]
            idx = self._indices[pi]
            if idx is None:
                out.append(piece.reshape(shape).clone())
            else:
                full = torch.zeros(self.numels[pi], dtype=values.dtype, device=values.device)
                full[idx.to(values.device)] = piece
                out.append(full.reshape(shape))
        return out

    def fill_grad(self, model: nn.Module, values: torch.Tensor) -> None:
        """Set ``p.grad`` of every trainable parameter from ``values`` so any torch.optim
        optimizer can step; frozen parameters keep ``grad = None`` (optimizers skip them)."""
        params = list(model.parameters())
        if len(params) != len(self.shapes):
            raise ValueError("model does not match these coordinates")
        for p, g in zip(params, self.scatter(values)):
            p.grad = g.to(device=p.device, dtype=p.dtype) if p.requires_grad else None

    def gather(self, tensors) -> torch.Tensor:
        """Inverse of scatter: the active entries of per-parameter tensors as one 1-D tensor."""
        pieces = []
        for pi, t in enumerate(tensors):
            flat = t.reshape(-1)
            idx = self._indices[pi]
            pieces.append(flat if idx is None else flat[idx.to(flat.device)])
        return torch.cat(pieces) if pieces else torch.zeros(0)
