"""Downstream accuracy: what the synthetic data is for.

Train the fixed `SmallCNN` on labelled synthetic images and test it on the REAL test split; the
same classifier trained on real training data gives the reference ("real-data accuracy"). This is
a benchmark only: test-split numbers never feed back into tuning (docs/design.md §7).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.models.scoring_cnn import accuracy, train_classifier

DEFAULT_EPOCHS = 3


def cap_records(ds: ImageDataset, max_records: int | None, seed: int = 0) -> ImageDataset:
    """A seeded random subset of at most `max_records` records (the set itself if smaller)."""
    if max_records is None or len(ds) <= max_records:
        return ds
    if max_records < 1:
        raise ValueError(f"max_records must be >= 1, got {max_records}")
    gen = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=gen)[:max_records])


def check_compatible(train: ImageDataset, test: ImageDataset) -> None:
    """Fail early with a clear message when train and test sets cannot be compared."""
    if train.shape != test.shape:
        raise ValueError(
            f"{train.name} images {train.shape} and {test.name} images {test.shape} differ in "
            "shape; generate at the real data's resolution"
        )
    if train.num_classes != test.num_classes:
        raise ValueError(
            f"{train.name} has {train.num_classes} classes but {test.name} has "
            f"{test.num_classes}; the label spaces must match"
        )


def train_and_score(
    train: ImageDataset,
    test: ImageDataset,
    *,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 1e-3,
    max_train_records: int | None = None,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, int], None] | None = None,
) -> tuple[nn.Module, float]:
    """Train the fixed CNN on `train`, return (model, accuracy on `test`)."""
    check_compatible(train, test)
    train = cap_records(train, max_train_records, seed)
    model = train_classifier(
        train, epochs, batch_size=batch_size, lr=lr, seed=seed, max_steps=max_steps, device=device,
        on_epoch=on_epoch,
    )
    return model, accuracy(model, test)


def downstream_accuracy(
    synthetic: ImageDataset,
    real_test: ImageDataset,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    max_train_records: int | None = None,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
) -> float:
    """Accuracy on the real test split of the fixed CNN trained on labelled synthetic images."""
    return train_and_score(
        synthetic, real_test, epochs=epochs, seed=seed, batch_size=batch_size, lr=lr,
        max_train_records=max_train_records, max_steps=max_steps, device=device,
    )[1]


def real_data_accuracy(real_train: ImageDataset, real_test: ImageDataset, epochs: int = DEFAULT_EPOCHS,
                       seed: int = 0, **kwargs: Any) -> float:
    """Reference: the same CNN, same budget, trained on real training data."""
    return downstream_accuracy(real_train, real_test, epochs, seed, **kwargs)
