"""The black-box classifier of the certified-defense and attack tasks, and the pixel space they share.

Both applications see the digits classifier from outside: images in pixel space
``[0, 1]`` go in, logits come out, nothing else (no gradient, no weights). The
classifier is an ordinary ``digits_cnn`` (or any zoo model) trained beforehand by
backprop on clean images; :class:`PixelClassifier` puts the data set's normalization in
front of it so that callers work in ``[0, 1]``, where a noise level or an L-infinity
budget has its usual meaning. :class:`BlackBox` is the only handle the ZO side gets: a
no-grad call on detached numpy-able values, with a query counter.

Training is deterministic (seeded generators, fixed batch order) and, under MPI, done
on rank 0 and broadcast, so every rank holds the identical black box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..seeding import derive_seed


@dataclass
class PixelData:
    """A data set in pixel space ``[0, 1]`` and the normalization its classifier expects."""

    train_x: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    train_y: torch.Tensor  # int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    scale: float  # raw pixel value of 1.0 (16 for digits, 255 for 8-bit images)
    mean: tuple  # per-channel mean / std in raw units (the classifier's input normalization)
    std: tuple

    @property
    def input_shape(self) -> tuple:
        return tuple(self.train_x.shape[1:])


def load_pixels(cfg_data) -> PixelData:
    """The data set of ``cfg_data`` (see :func:`zohpc.data.load_raw`) with pixels scaled to ``[0, 1]``."""
    from ..data import load_raw, normalize
    from ..errors import DataError

    raw = load_raw(cfg_data)
    if raw.mean is None:
        raise DataError(f"data set '{raw.name}': the black-box tasks need raw pixels (a data set with "
                        "a stored normalization), not pre-normalized floats")
    splits = normalize(raw, limit=int(getattr(cfg_data, "limit", 0) or 0))
    mean = tuple(float(m) for m in np.asarray(raw.mean, dtype=np.float64))
    std = tuple(float(s) for s in np.asarray(raw.std, dtype=np.float64))
    scale = float(max(raw.train_x.max(), raw.test_x.max()))
    if not scale > 0:
        raise DataError(f"data set '{raw.name}': all pixels are zero")
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def to_pixels(x):  # undo the normalization, then scale to [0, 1]
        return ((x * s + m) / scale).clamp_(0.0, 1.0).contiguous()

    return PixelData(to_pixels(splits.train_x), splits.train_y, to_pixels(splits.test_x), splits.test_y,
                     splits.num_classes, scale, mean, std)


class PixelClassifier(nn.Module):
    """A classifier for ``[0, 1]`` pixels: the data set's normalization, then ``net``."""

    def __init__(self, net: nn.Module, scale: float, mean, std):
        super().__init__()
        self.net = net
        c = len(mean)
        self.register_buffer("shift", torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1) / scale)
        self.register_buffer("inv", scale / torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1))

    def forward(self, p):
        return self.net((p - self.shift) * self.inv)


def train_classifier(data: PixelData, model_name: str = "digits_cnn", epochs: int = 30, lr: float = 3e-3,
                     batch_size: int = 64, seed: int = 0, comm=None) -> PixelClassifier:
    """The black box: ``model_name`` trained by backprop (Adam) on clean images, in eval mode.

    Trained on rank 0 of ``comm`` and broadcast (every rank ends with identical weights).
    """
    from ..data import epoch_batches
    from ..models import build_model

    with torch.random.fork_rng(devices=[]):  # the zoo initializes from the global generator
        torch.manual_seed(derive_seed("blackbox-init", seed))
        net = build_model(model_name, data.input_shape, data.num_classes)
    clf = PixelClassifier(net, data.scale, data.mean, data.std)
    if comm is None or comm.is_driver:
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        clf.train()
        for epoch in range(epochs):
            for idx in epoch_batches(data.train_x.shape[0], batch_size, derive_seed("blackbox-batches", seed), epoch):
                opt.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(clf(data.train_x[idx]), data.train_y[idx])
                loss.backward()
                opt.step()
    if comm is not None and comm.size > 1:
        from ..steps.protocol import share_state

        share_state(comm, clf)
    clf.eval()
    for p in clf.parameters():
        p.requires_grad_(False)
    return clf


def build_with_classifier(cfg, defaults: dict, name: str, make_task):
    """A task factory's common part: the ``[task]`` options, the pixel data and the black-box
    classifier trained beforehand; ``make_task(clf, data, opts)`` builds the task itself."""
    from ..comm import world
    from .base import task_options

    opts = task_options(cfg, defaults, name)
    data = load_pixels(cfg.data)
    clf = train_classifier(data, opts["classifier"], int(opts["classifier_epochs"]), seed=int(opts["seed"]),
                           comm=world())
    return make_task(clf, data, opts)


@torch.no_grad()
def accuracy(clf: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    correct = 0
    for i in range(0, x.shape[0], batch):
        correct += int((clf(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum())
    return correct / max(1, x.shape[0])


class BlackBox:
    """Query access only: ``bb(x) -> logits`` as a detached float64 numpy array; counts queries.

    One query is one image (a batch of B images costs B queries), as black-box attack
    papers count them.
    """

    def __init__(self, classifier: nn.Module):
        self._clf = classifier
        self.queries = 0

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> np.ndarray:
        x = x.detach()
        single = x.dim() == 3
        if single:
            x = x[None]
        out = self._clf(x.float()).double().numpy()
        self.queries += x.shape[0]
        return out[0] if single else out
