"""The one BatchNorm guard of zohpc: loss queries see batch statistics and change nothing.

A loss query must measure the model, not move it: BatchNorm normalizes with the statistics
of the query's own minibatch (training-mode semantics, as DeepZero does) and its running
statistics stay exactly as they were. Only the driver's one unperturbed forward per step
updates them (outside this guard).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch.nn as nn


def batchnorm_modules(model: nn.Module) -> list:
    """Every BatchNorm-type module of ``model`` (``_BatchNorm`` covers 1d/2d/3d, lazy, sync)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextmanager
def batch_stats_only(model: nn.Module):
    """Inside: every BatchNorm uses batch statistics and owns no running statistics.

    Each BN module is put in training mode with ``track_running_stats = False`` and its
    running buffers unset (so nothing, not even ``torch.func.vmap``, can update them); on
    exit, also on an exception, the mode, the flag and the very same buffer tensors are put
    back. Other modules are untouched.
    """
    bns = batchnorm_modules(model)
    saved = [(m.training, m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked)
             for m in bns]
    try:
        for m in bns:
            m.training = True
            m.track_running_stats = False
            m.running_mean = None
            m.running_var = None
            m.num_batches_tracked = None
        yield model
    finally:
        for m, (training, track, mean, var, count) in zip(bns, saved):
            m.training = training
            m.track_running_stats = track
            m.running_mean = mean
            m.running_var = var
            m.num_batches_tracked = count
