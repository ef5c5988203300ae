"""A fixed small CNN that scores synthetic data: it is trained on a synthetic set and tested on
held-out data, in a Tune trial's score (`tuning.scoring`), in the audit of that score, and in the
downstream benchmark, where it is also the domain feature extractor.

The architecture is deliberately fixed (no knobs) so that downstream accuracies, trial scores and
domain FIDs from different runs are comparable. It is trained on synthetic data only; a trial's
count of correct predictions on the private validation split is released with noise by
`tuning.scoring`, and evaluation is a benchmark run after the fact (docs/design.md §7).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from ..data.dataset import ImageDataset

#: Inputs larger than this are average-pooled down to it first, so 64x64 and 128x128 images cost
#: about as much as 32x32 ones on a CPU.
_WORKING_SIZE = 32
#: Width of the penultimate layer, i.e. the dimension of the features used for the domain FID.
FEATURE_DIM = 128


class SmallCNN(nn.Module):
    """Three conv blocks, adaptive average pool to 4x4, then FC -> features -> logits.

    Works for any square-ish input (28x28x1, 32x32x3, 64x64x3, 128x128x3, ...). The 4x4 pooled
    map (rather than a global pool) keeps where things are in the image, which small benchmarks
    such as MNIST need.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int) -> None:
        super().__init__()
        if in_channels < 1 or num_classes < 2 or image_size < 8:
            raise ValueError(
                f"SmallCNN needs in_channels >= 1, num_classes >= 2 and image_size >= 8, got "
                f"{in_channels}, {num_classes}, {image_size}"
            )
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.image_size = image_size
        self.downsample: nn.Module = (
            nn.AdaptiveAvgPool2d(_WORKING_SIZE) if image_size > _WORKING_SIZE else nn.Identity()
        )
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(64 * 16, FEATURE_DIM),
        )
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(FEATURE_DIM, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate layer (N, FEATURE_DIM), taken before its ReLU: the `domain_fid` embedding.

        Pre-activation, because after the ReLU many units are zero on every image, which wastes
        dimensions and makes the feature covariance singular.
        """
        return self.body(self.downsample(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def train_classifier(
    ds: ImageDataset,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """Train a fresh `SmallCNN` on `ds` with Adam; returns it in eval mode. `on_epoch(done, epochs)`
    is called after each epoch (progress: a CPU epoch on 60k images can take minutes).

    Seeded through a private generator (initialisation and shuffling), so results are repeatable
    and the caller's global RNG state is left untouched. `max_steps` caps the number of
    optimiser steps (useful for quick checks) regardless of `epochs`.
    """
    if len(ds) == 0:
        raise ValueError(f"{ds.name}: cannot train a classifier on an empty data set")
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    c, h, w = ds.shape
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmallCNN(c, ds.num_classes, max(h, w))
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(ds)
    steps = 0
    for epoch in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            idx = order[start : start + batch_size]
            x = ds.as_float(idx).to(device)
            y = ds.labels[idx].to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        if on_epoch is not None:
            on_epoch(epoch + 1, epochs)
        if max_steps is not None and steps >= max_steps:
            break
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, ds: ImageDataset, batch_size: int = 512) -> torch.Tensor:
    """Predicted labels (N,) on the CPU, computed in eval mode batch by batch."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    out = []
    for start in range(0, len(ds), batch_size):
        x = ds.as_float(slice(start, start + batch_size)).to(device)
        out.append(model(x).argmax(dim=1).cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.int64)


def correct_count(model: nn.Module, ds: ImageDataset, batch_size: int = 512) -> int:
    """Number of correct predictions: the sensitivity-1 count that private trial scoring noises."""
    if len(ds) == 0:
        return 0
    return int((predict(model, ds, batch_size) == ds.labels).sum())


def accuracy(model: nn.Module, ds: ImageDataset, batch_size: int = 512) -> float:
    """Fraction of `ds` classified correctly (0.0 for an empty set would hide bugs, so it raises)."""
    if len(ds) == 0:
        raise ValueError(f"{ds.name}: accuracy of an empty data set is undefined")
    return correct_count(model, ds, batch_size) / len(ds)
