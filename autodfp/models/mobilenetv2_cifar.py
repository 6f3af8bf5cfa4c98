"""MobileNetV2 (Sandler et al. 2018) adapted to 32x32 inputs: stride 1 in the stem and the
second stage, as in the common CIFAR variants."""

from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

# (expansion, out_channels, blocks, stride)
_SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
             (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


class InvertedResidual(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, expansion: int, stride: int):
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expansion != 1:
            layers += [nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                       nn.ReLU6(inplace=True)]
        layers += [nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
                   nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
                   nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv(x)
        return x + out if self.use_residual else out


class CifarMobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32),
                                  nn.ReLU6(inplace=True))
        blocks: list[nn.Module] = []
        in_ch = 32
        for expansion, out_ch, n, stride in _SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, expansion, stride if i == 0 else 1))
                in_ch = out_ch
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Conv2d(in_ch, 1280, 1, bias=False), nn.BatchNorm2d(1280),
                                  nn.ReLU6(inplace=True))
        self.classifier = nn.Linear(1280, num_classes)

    def forward(self, x):
        out = self.head(self.blocks(self.stem(x)))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def mobilenetv2(num_classes: int = 10) -> CifarMobileNetV2:
    return CifarMobileNetV2(num_classes)
