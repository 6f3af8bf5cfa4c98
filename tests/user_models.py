"""A user model importable as ``tests.user_models:tiny_net`` (for the pkg.module:factory path)."""

import torch.nn as nn


def tiny_net():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


NOT_A_FACTORY = 3
