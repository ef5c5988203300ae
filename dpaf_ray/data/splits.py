"""The private validation split and per-worker shards of an `ImageDataset`.

The split is per record (DESIGN rule 14): a record is held out for validation when a keyed
hash of its own bytes and label, under the run's split secret, falls below the fraction.
Adding or removing one record therefore moves no other record, and identical records land
on the same side. Sizes used by the mechanisms are the public expectations (1−f)·N and f·N,
never the realised counts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .dataset import DataError, ImageDataset
from .sources import check_image_shape, load_dataset

if TYPE_CHECKING:  # a split key is a `privacy.randomness.RunSecret`; only its keyed hash is used
    from ..config import TrainConfig
    from ..privacy.randomness import RunSecret

SPLIT_LABEL = "split"  # the split key is the run (or search) secret's child of this name

__all__ = ["PrivateData", "held_out", "load_private_data", "load_training_data", "split_validation", "shard_indices"]


def held_out(ds: ImageDataset, fraction: float, key: "RunSecret") -> torch.Tensor:
    """Bool mask: True for records on the validation side. Record i's entry depends only on
    record i (its pixels and label) and the key."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    threshold = math.floor(fraction * 2.0 ** 53)  # P(held out) = threshold/2^53 <= fraction
    images = ds.images.contiguous().numpy().reshape(len(ds), -1)
    labels = ds.labels.tolist()
    mask = [(key.keyed_hash64(int(y).to_bytes(8, "little", signed=True) + row.tobytes()) >> 11) < threshold
            for row, y in zip(images, labels)]
    return torch.tensor(mask, dtype=torch.bool)


def split_validation(ds: ImageDataset, fraction: float, key: "RunSecret") -> tuple[ImageDataset, ImageDataset]:
    """(train, validation), disjoint, covering `ds`, in the original record order."""
    mask = held_out(ds, fraction, key)
    return (ds.subset(torch.nonzero(~mask).squeeze(1), f"{ds.name}-train"),
            ds.subset(torch.nonzero(mask).squeeze(1), f"{ds.name}-val"))


@dataclass(frozen=True)
class PrivateData:
    """The data set handed in, split; N and the fraction are public, the realised sizes are not."""

    train: ImageDataset
    validation: ImageDataset
    n_records: int  # N: size of the data set handed in (public by assumption, as in DP-SGD)
    validation_fraction: float

    @property
    def expected_train(self) -> float:
        return (1.0 - self.validation_fraction) * self.n_records

    @property
    def expected_validation(self) -> float:
        return self.validation_fraction * self.n_records

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.train.shape

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def load_private_data(spec: str, root: str | None, fraction: float, split_key: "RunSecret",
                      num_classes: int | None = None) -> PrivateData:
    """The training data of a run: loaded, shape-checked, split by the run's split key."""
    ds = load_dataset(spec, "train", root, num_classes=num_classes)
    check_image_shape(ds)
    train, val = split_validation(ds, fraction, split_key)
    return PrivateData(train, val, len(ds), fraction)


def load_training_data(cfg: "TrainConfig", split_key: "RunSecret") -> PrivateData:
    """(train, private validation) of a run or search: the validation split is never trained on.

    `split_key` is `secret.child(SPLIT_LABEL)` of the run's secret, or of the search's for all its
    trials."""
    return load_private_data(cfg.dataset, cfg.data_root, cfg.validation_fraction, split_key, cfg.num_classes)


def shard_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of worker `rank`'s contiguous shard, ``[rank*n//W, (rank+1)*n//W)``: the shards of
    all ranks are disjoint and cover ``range(n)``, so each record lives on exactly one worker."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return torch.arange(rank * n // world_size, (rank + 1) * n // world_size, dtype=torch.int64)
