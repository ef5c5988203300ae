"""The DP label classifier that teaches the generator which class an image shows (issue #13).

A small tanh CNN (the "tempered sigmoid" network that DP-SGD trains well: Papernot, Thakurta,
Song, Chien & Erlingsson, AAAI 2021), trained only by DP-SGD on real records. No normalisation
layer mixes records, so each record's gradient depends on that record alone.
"""
from __future__ import annotations

from torch import nn

from .architecture import Architecture


class LabelClassifier(nn.Module):
    """conv 8×8/2 (16) → tanh → maxpool 2/1 → conv 4×4/2 (32) → tanh → maxpool 2/1 → pool to 4×4
    → FC 32 → tanh → FC K. At 28×28 the adaptive pool is the identity (the map is 4×4)."""

    def __init__(self, arch: Architecture, num_classes: int, width: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.width, self.hidden_dim = width, hidden
        self.body = nn.Sequential(
            nn.Conv2d(arch.channels, width, 8, stride=2, padding=3), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.Conv2d(width, 2 * width, 4, stride=2), nn.Tanh(), nn.MaxPool2d(2, 1),
            nn.AdaptiveAvgPool2d(4), nn.Flatten(),
            nn.Linear(2 * width * 16, hidden), nn.Tanh(),
        )
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        return self.head(self.body(x))
