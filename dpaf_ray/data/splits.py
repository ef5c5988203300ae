"""The private validation split and per-worker shards of an `ImageDataset`.

The split is per record (docs/design.md rule 14): a record is held out for validation when a keyed
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
SUBSAMPLE_LABEL = "subsample"  # a subsampled search's membership key: the search secret's child of this name

__all__ = ["PrivateData", "Subsample", "held_out", "load_private_data", "load_training_data", "poisson_subsample",
           "split_validation", "shard_indices"]


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


def poisson_subsample(ds: ImageDataset, fraction: float, key: "RunSecret") -> torch.Tensor:
    """Bool mask of a Poisson subsample: each record is in with probability `fraction`,
    independently of every other record, drawn from the key (issue #14; the amplification in
    `privacy.subsample` needs that independence).

    A record's draw is a keyed hash of its label, its pixels and its occurrence number among
    identical records before it. Identical records therefore get independent draws (a hash of the
    content alone would put all copies on the same side, and adding a copy of a record would not be
    a fresh independent draw), and adding or removing one record changes no other record's draw up
    to exchanging identical copies, so the subsample as a multiset is a Poisson sample."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"subsample fraction must lie in (0, 1), got {fraction}")
    threshold = math.floor(fraction * 2.0 ** 53)  # P(in) = threshold/2^53 <= fraction
    images = ds.images.contiguous().numpy().reshape(len(ds), -1)
    labels = ds.labels.tolist()
    seen: dict[bytes, int] = {}
    mask = []
    for row, y in zip(images, labels):
        content = int(y).to_bytes(8, "little", signed=True) + row.tobytes()
        occurrence = seen.get(content, 0)
        seen[content] = occurrence + 1
        mask.append((key.keyed_hash64(b"subsample:" + occurrence.to_bytes(8, "little") + content) >> 11) < threshold)
    return torch.tensor(mask, dtype=torch.bool)


@dataclass(frozen=True)
class Subsample:
    """A subsampled search's public rate γ and its membership key (private: a child of the search
    secret; it travels like a split key and is never written outside checkpoints)."""

    fraction: float
    key: "RunSecret"

    def __repr__(self) -> str:
        return f"Subsample(fraction={self.fraction!r}, key=<redacted>)"


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
    n_records: float  # N: size of the data set handed in (public by assumption, as in DP-SGD); γ·N for a subsample
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
                      num_classes: int | None = None, subsample: Subsample | None = None) -> PrivateData:
    """The training data of a run: loaded, shape-checked, split by the run's split key.

    With `subsample`, only the Poisson subsample is kept and then split, so the validation side
    is part of the subsample too; N becomes the public expected size γ·N."""
    ds = load_dataset(spec, "train", root, num_classes=num_classes)
    if ds.num_classes < 2:  # before any batch or group check, which would blame the wrong knob
        raise DataError(f"{spec}: {ds.num_classes} class; a class-conditional generator needs at least 2. Put each "
                        "class's images in its own sub-folder (sorted folder names give labels 0..K-1), or give a "
                        "Parquet table with labels 0..K-1 and --num-classes K (K >= 2)")
    check_image_shape(ds)
    n_records: float = len(ds)
    if subsample is not None:
        n_records = subsample.fraction * len(ds)
        ds = ds.subset(torch.nonzero(poisson_subsample(ds, subsample.fraction, subsample.key)).squeeze(1),
                       f"{ds.name}-subsample")
    train, val = split_validation(ds, fraction, split_key)
    return PrivateData(train, val, n_records, fraction)


def load_training_data(cfg: "TrainConfig", split_key: "RunSecret", subsample: Subsample | None = None) -> PrivateData:
    """(train, private validation) of a run or search: the validation split is never trained on.

    `split_key` is `secret.child(SPLIT_LABEL)` of the run's secret, or of the search's for all its
    trials; `subsample` (a subsampled search's trials) keeps only its Poisson subsample first."""
    return load_private_data(cfg.dataset, cfg.data_root, cfg.validation_fraction, split_key, cfg.num_classes,
                             subsample)


def shard_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of worker `rank`'s contiguous shard, ``[rank*n//W, (rank+1)*n//W)``: the shards of
    all ranks are disjoint and cover ``range(n)``, so each record lives on exactly one worker."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return torch.arange(rank * n // world_size, (rank + 1) * n // world_size, dtype=torch.int64)
