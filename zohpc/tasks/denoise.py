"""Black-box defense by denoised smoothing (DeepZero's ZO-DS, after Salman et al. 2020).

A classifier trained beforehand is available only through its outputs (the black box).
A small convolutional denoiser in front of it is trained so that the black box classifies
``denoiser(x + e)`` correctly for Gaussian noise ``e``; randomized smoothing of the pair
then certifies L2 robustness (:mod:`zohpc.smoothing`). The denoiser is the task's model;
the black-box call lives in the per-copy loss, so no gradient path exists and only ZO can
train it.

The task (``task.name = "zohpc.tasks.denoise:build"``): model = :class:`Denoiser`; train
data = ``copies`` noisy versions of every training image (noise drawn once, seeded), with
their labels; test data = one noisy version of every test image; loss = cross entropy of
the black box's logits on the denoised minibatch (numpy; per copy, and for Q stacked copies in
one black-box call); metric = accuracy of
the black box on the denoised noisy test images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..seeding import derive_seed, generator
from .base import Task
from .blackbox import BlackBox, PixelData, build_with_classifier

DEFAULTS = {
    "sigma": 0.25,  # noise level of smoothing and training, in [0, 1] pixel units
    "copies": 4,  # noisy versions of each training image
    "width": 8,  # denoiser channels
    "depth": 3,  # denoiser conv layers
    "classifier": "digits_cnn",  # zoo model of the black box
    "classifier_epochs": 30,  # its backprop training (before the task starts)
    "seed": 0,  # noise, classifier and denoiser initialization
}


class Denoiser(nn.Module):
    """Residual conv denoiser ``x + body(x)``; ``depth`` 3x3 convs of ``width`` channels, ReLU between.

    The last conv starts at a tenth of its default scale, so the untrained denoiser is
    close to the identity (the black box alone) and training starts from there.
    """

    def __init__(self, channels: int = 1, width: int = 8, depth: int = 3):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"Denoiser: need depth >= 1 and width >= 1, got {depth}, {width}")
        layers: list[nn.Module] = []
        ch = channels
        for i in range(depth):
            out = channels if i == depth - 1 else width
            layers.append(nn.Conv2d(ch, out, 3, padding=1))
            if i < depth - 1:
                layers.append(nn.ReLU())
            ch = out
        self.body = nn.Sequential(*layers)
        with torch.no_grad():
            self.body[-1].weight.mul_(0.1)
            self.body[-1].bias.zero_()

    def forward(self, x):
        return x + self.body(x)


def make_denoiser(channels: int, width: int, depth: int, seed: int) -> Denoiser:
    """A :class:`Denoiser` initialized from ``seed`` alone (identical on every rank)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed("denoiser-init", seed))
        return Denoiser(channels, width, depth)


def noisy_copies(x: torch.Tensor, copies: int, sigma: float, seed: int, tag: str) -> torch.Tensor:
    """``copies`` noisy versions of ``x`` (copy-major), noise from the stream ``(tag, seed, copy)``."""
    out = [x + sigma * torch.randn(x.shape, generator=generator(tag, seed, c), dtype=x.dtype) for c in range(copies)]
    return torch.cat(out).contiguous()


def cross_entropy_np(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross entropy of logits (B, K) against integer labels, in float64 numpy."""
    return float(cross_entropy_copies(logits[None], labels)[0])


def cross_entropy_copies(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Mean cross entropy of each copy's logits (Q, B, K) against labels (B,): shape (Q,)."""
    z = logits - logits.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=-1))
    return np.mean(lse - np.take_along_axis(z, labels[None, :, None], -1)[..., 0], axis=1)


def make_task(classifier: nn.Module, data: PixelData, opts: dict) -> Task:
    """The task around a given black box (``build`` trains one; a study passes its own)."""
    bb = BlackBox(classifier)
    sigma, copies, seed = float(opts["sigma"]), int(opts["copies"]), int(opts["seed"])
    train_x = noisy_copies(data.train_x, copies, sigma, seed, "denoise-train-noise")
    train_y = data.train_y.repeat(copies)
    test_x = noisy_copies(data.test_x, 1, sigma, seed, "denoise-test-noise")

    def loss(outputs, targets):
        return cross_entropy_np(bb(outputs), targets.numpy())

    def batched_loss(outputs, targets):  # (Q, B, ...): one black-box call for every copy
        logits = bb(outputs.reshape(-1, *outputs.shape[2:]))
        return torch.from_numpy(cross_entropy_copies(logits.reshape(*outputs.shape[:2], -1), targets.numpy()))

    def metrics(outputs, targets):
        return {"accuracy": float(np.mean(bb(outputs).argmax(1) == targets.numpy()))}

    model = make_denoiser(data.input_shape[0], int(opts["width"]), int(opts["depth"]), seed)
    task = Task(model=model, train=(train_x, train_y), test=(test_x, data.test_y), loss=loss,
                batched_loss=batched_loss, metrics=metrics, name="denoise", info=dict(opts))
    return task


def build(cfg) -> Task:
    """Factory for ``task.name = "zohpc.tasks.denoise:build"`` (options: see ``DEFAULTS``)."""
    return build_with_classifier(cfg, DEFAULTS, "denoise", make_task)


def train_fo(denoiser: nn.Module, classifier: nn.Module, train, epochs: int, lr: float = 3e-3,
             batch_size: int = 64, seed: int = 0) -> nn.Module:
    """FO-DS: the same objective trained by backprop through a white-box copy of the classifier."""
    from ..data import epoch_batches

    x, y = train
    for p in classifier.parameters():
        p.requires_grad_(False)
    classifier.eval()
    opt = torch.optim.Adam(denoiser.parameters(), lr=lr)
    for epoch in range(epochs):
        for idx in epoch_batches(x.shape[0], batch_size, derive_seed("fo-ds-batches", seed), epoch):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(classifier(denoiser(x[idx])), y[idx]).backward()
            opt.step()
    return denoiser
