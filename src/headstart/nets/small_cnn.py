"""The network `--strategy scratch` trains from a random initialisation: the baseline transfer learning beats."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """The from-scratch baseline: three conv blocks (2 x conv-BN-ReLU, max-pool) and global pooling.

    `--strategy scratch` puts the usual head (linear or Dense 256 -> Dense N) on top and
    trains everything with the fine-tuning loop.
    """

    def __init__(self, widths: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        blocks, c_in = [], 3
        for c in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(c_in, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.MaxPool2d(2)))
            c_in = c
        self.features = nn.Sequential(*blocks)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x))
