"""Small CNNs: DeepZero's adjustable CNN (``cnn_d1`` .. ``cnn_d5``) and the digits default."""

from __future__ import annotations

import torch.nn as nn


def conv_bn_relu_pool(in_ch: int, out_ch: int) -> list[nn.Module]:
    # ceil_mode keeps a 1x1 map at 1x1, so deep variants also run on small images
    return [
        nn.Conv2d(in_ch, out_ch, 3, padding=1),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
    ]


class AdjustableCNN(nn.Module):
    """DeepZero's CNN of ``depth`` conv-BN-ReLU-maxpool blocks of 18 channels.

    Adaptive average pool and one linear layer follow; 730 (depth 1) to 12,610 (depth 5)
    parameters for 3-channel inputs and 10 classes.
    """

    width = 18

    def __init__(self, depth: int, in_ch: int = 3, num_classes: int = 10):
        super().__init__()
        if not 1 <= depth <= 5:
            raise ValueError(f"cnn depth must be 1..5, got {depth}")
        layers: list[nn.Module] = []
        ch = in_ch
        for _ in range(depth):
            layers += conv_bn_relu_pool(ch, self.width)
            ch = self.width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self.width, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))


class DigitsCNN(nn.Module):
    """The embedded default's model for 8x8 digits: two conv blocks and a linear layer.

    Kept small (about 2,000 parameters) because every sparse-CGE step queries each
    active coordinate once.
    """

    def __init__(self, in_ch: int = 1, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu_pool(in_ch, width),  # 8x8 -> 4x4
            *conv_bn_relu_pool(width, 2 * width),  # 4x4 -> 2x2
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * 4, num_classes)

    def forward(self, x):
        return self.fc(self.flatten(self.pool(self.features(x))))
