"""Every random stream of a run, derived from the run's seed by hashing (one scheme, one place).

``derive_seed(tag, *parts)`` is SHA-256 of ``tag:part:part...`` (decimal integers), first
8 bytes big-endian, top bit cleared: stable across platforms and Python versions, and
(seed, epoch) pairs never collide the way ``seed * K + epoch`` would. A stream is named by
its tag ("batches", "rge-direction", "layerwise-mask", ...) so two purposes never share one.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(tag: str, *parts) -> int:
    """A 63-bit seed for the stream ``tag`` at ``parts`` (integers), e.g. ``("batches", seed, epoch)``."""
    text = ":".join([str(tag), *(str(int(p)) for p in parts)]).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "big") & ((1 << 63) - 1)


def generator(tag: str, *parts, device="cpu") -> torch.Generator:
    """A torch generator seeded with :func:`derive_seed` (CPU by default: same draws on any device)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(tag, *parts))
    return gen
