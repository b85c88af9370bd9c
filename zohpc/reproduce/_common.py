"""Helpers shared by the studies of this package: a plain backprop training loop (the FO
baselines, with zohpc's batch order and lr schedule) and a figure writer."""

from __future__ import annotations

import math

import torch

from ..data import epoch_batches


def cosine(step: int, total: int) -> float:
    """zohpc's ``optim.schedule = "cosine"`` factor (per step, no warm-up)."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(1, total)))


def train_backprop(model, x, y, loss_fn, *, epochs: int, batch_size: int, lr: float, seed: int,
                   optimizer: str = "adam", momentum: float = 0.9) -> float:
    """Train ``model`` in place by backpropagation; returns the seconds it took.

    The same minibatches (``epoch_batches(n, batch_size, seed, epoch)``), optimizer and
    cosine schedule as a zohpc run with those settings, so FO and ZO differ in the gradient only.
    """
    import time

    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum)
    n = x.shape[0]
    per_epoch = len(epoch_batches(n, batch_size, seed, 0))
    total = epochs * per_epoch
    step = 0
    t0 = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for idx in epoch_batches(n, batch_size, seed, epoch):
            for group in opt.param_groups:
                group["lr"] = lr * cosine(step, total)
            loss = loss_fn(model(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    return time.perf_counter() - t0
