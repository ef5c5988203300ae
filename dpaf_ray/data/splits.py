"""Deterministic hold-outs and per-worker shards of an `ImageDataset`."""
from __future__ import annotations

import torch

from .dataset import DataError, ImageDataset

__all__ = ["split_validation", "shard_indices"]


def split_validation(ds: ImageDataset, fraction: float, seed: int) -> tuple[ImageDataset, ImageDataset]:
    """Split the TRAIN data into (train, validation): a seeded random hold-out of
    ``round(fraction * len(ds))`` records that is never trained on (the private validation split).

    The two parts are disjoint, cover `ds`, and keep the original record order, so the same
    (data, fraction, seed) always gives the same split on every worker and every trial.
    """
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"validation fraction must be in [0, 1), got {fraction}")
    n = len(ds)
    n_val = int(round(fraction * n))
    if n and n_val >= n:
        raise DataError(f"{ds.name}: a validation fraction of {fraction} of {n} records leaves no training data")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    val_idx = perm[:n_val].sort().values
    train_idx = perm[n_val:].sort().values
    return ds.subset(train_idx, f"{ds.name}-train"), ds.subset(val_idx, f"{ds.name}-val")


def shard_indices(n: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices of worker `rank`'s contiguous shard, ``[rank*n//W, (rank+1)*n//W)``: the shards of
    all ranks are disjoint and cover ``range(n)``, so each record lives on exactly one worker."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return torch.arange(rank * n // world_size, (rank + 1) * n // world_size, dtype=torch.int64)
