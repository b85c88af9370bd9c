"""CIFAR ResNets (He et al. 2016, option-A shortcuts): depth 6n+2, 16/32/64 channels."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F


class ShortcutA(nn.Module):
    """Parameter-free shortcut: stride-2 subsampling and zero-padded channels."""

    def __init__(self, extra_channels: int):
        super().__init__()
        self.pad = extra_channels // 2

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.relu2 = nn.ReLU()
        self.shortcut = ShortcutA(out_ch - in_ch) if (stride != 1 or in_ch != out_ch) else nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, in_ch: int = 3, num_classes: int = 10):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(in_ch, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU()
        blocks, ch = [], 16
        for stage, width in enumerate((16, 32, 64)):
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(BasicBlock(ch, width, stride))
                ch = width
        self.layer1 = nn.Sequential(*blocks[:n])
        self.layer2 = nn.Sequential(*blocks[n:2 * n])
        self.layer3 = nn.Sequential(*blocks[2 * n:])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.flatten(self.pool(x)))


def cifar_resnet(depth: int, in_ch: int = 3, num_classes: int = 10) -> CifarResNet:
    return CifarResNet(depth, in_ch, num_classes)
