"""Which examples a step sees: epoch batches, test batches, augmentation, class-balanced samples.

The randomness comes from :mod:`zohpc.seeding` generators named by a tag and
``(seed, epoch[, step])``, so any rank and any resumed run reproduces it without communication.
"""

from __future__ import annotations

from typing import Iterator

import torch

from ..seeding import generator
from .splits import DataSplits


def epoch_batches(num_examples: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """Index batches of one epoch: a permutation from ``derive_seed("batches", seed, epoch)``.

    ``torch.randperm(num_examples)`` on a CPU generator seeded with that value, cut into
    ``num_examples // batch_size`` batches of exactly ``batch_size`` (the incomplete tail
    is dropped, so every step sees the same batch size and BatchNorm statistics stay
    comparable); if ``num_examples < batch_size`` there is one batch of all examples.
    Any rank computes the same list from the same arguments.
    """
    if num_examples < 1:
        raise ValueError(f"epoch_batches: num_examples must be >= 1, got {num_examples}")
    if batch_size < 1:
        raise ValueError(f"epoch_batches: batch_size must be >= 1, got {batch_size}")
    perm = torch.randperm(num_examples, generator=generator("batches", seed, epoch), dtype=torch.int64)
    if num_examples < batch_size:
        return [perm]
    full = (num_examples // batch_size) * batch_size
    return list(perm[:full].view(-1, batch_size).unbind(0))


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Number of batches :func:`epoch_batches` returns."""
    return max(1, num_examples // batch_size)


def test_batches(splits: DataSplits, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive ``(x, y)`` views over the test set in file order; the last may be short."""
    if batch_size < 1:
        raise ValueError(f"test_batches: batch_size must be >= 1, got {batch_size}")
    for start in range(0, splits.num_test, batch_size):
        yield splits.test_x[start:start + batch_size], splits.test_y[start:start + batch_size]


test_batches.__test__ = False  # not a pytest test despite the name


def augment_batch(x: torch.Tensor, seed: int, epoch: int, step: int, padding: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation: zero-pad by ``padding``, random crop back, flip with p=1/2.

    Draws, in order, from a CPU generator seeded with ``derive_seed("augment", seed, epoch,
    step)``: row offsets ``dy`` and column offsets ``dx`` (each ``randint(0, 2*padding+1,
    (B,))``), then flips ``rand(B) < 0.5``. Example ``b`` becomes
    ``pad(x)[b, :, dy:dy+H, dx:dx+W]``, mirrored left-right when flipped. Vectorized with
    one advanced-indexing gather; works on any device and returns a new tensor.
    """
    if x.dim() != 4:
        raise ValueError(f"augment_batch: expected a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    b, c, h, w = x.shape
    if b == 0:
        return x.clone()
    gen = generator("augment", seed, epoch, step)
    span = 2 * padding + 1
    dy = torch.randint(0, span, (b,), generator=gen)
    dx = torch.randint(0, span, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]  # (B, H) rows of the padded image
    cols = dx[:, None] + torch.arange(w)[None, :]  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    dev = x.device
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    bidx = torch.arange(b, device=dev)[:, None, None]
    out = padded[bidx, :, rows.to(dev)[:, :, None], cols.to(dev)[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def class_balanced_indices(labels: torch.Tensor, per_class: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """Up to ``per_class`` training indices of every class, drawn reproducibly from ``seed``.

    For pruning scores that want a fixed class-balanced sample (GraSP uses 25 per class);
    classes with fewer examples contribute all of theirs. Sorted by class, then draw order.
    """
    labels = labels.cpu()
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if labels.numel() else 0
    perm = torch.randperm(labels.numel(), generator=generator("class-sample", seed))
    shuffled = labels[perm]
    picked = []
    for cls in range(num_classes):
        picked.append(perm[shuffled == cls][:per_class])
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.int64)
