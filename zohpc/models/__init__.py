"""Model zoo, by name. Every model is built from the data set's input shape and class count.

Models hold no randomness in their forward pass (no dropout): zeroth-order queries must
see a deterministic loss.
"""

from __future__ import annotations

import torch.nn as nn

from ..errors import ConfigError
from .cnn import AdjustableCNN, DigitsCNN
from .resnet import cifar_resnet

_RESNET_DEPTHS = (20, 32, 44, 56, 110)

MODEL_NAMES = ("digits_cnn", *(f"cnn_d{d}" for d in range(1, 6)), *(f"resnet{d}" for d in _RESNET_DEPTHS))


def build_model(name: str, input_shape, num_classes: int) -> nn.Module:
    """Build a registered model for inputs of shape (C, H, W) and ``num_classes`` outputs."""
    in_ch = int(input_shape[0])
    if name == "digits_cnn":
        return DigitsCNN(in_ch, num_classes)
    if name.startswith("cnn_d") and name in MODEL_NAMES:
        return AdjustableCNN(int(name[len("cnn_d"):]), in_ch, num_classes)
    if name.startswith("resnet") and name in MODEL_NAMES:
        return cifar_resnet(int(name[len("resnet"):]), in_ch, num_classes)
    raise ConfigError(f"config key 'model.name': {name!r} is not one of {', '.join(MODEL_NAMES)}")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["MODEL_NAMES", "build_model", "count_parameters"]
