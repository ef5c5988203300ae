"""Within-class diversity: a cheap mode-collapse detector.

A class-conditional GAN can score well on downstream accuracy while emitting one image per class;
the mean pairwise distance between images of the same class, relative to real data, exposes that.
"""
from __future__ import annotations

import math

import torch

from dpaf_ray.data.dataset import ImageDataset


def within_class_diversity(ds: ImageDataset, per_class: int = 200, seed: int = 0) -> dict:
    """Mean pairwise L2 distance between same-class images (pixels in [-1, 1]).

    Samples up to `per_class` images per class (seeded) to keep the cost O(K * per_class^2).
    Returns {"per_class": {class: distance}, "mean": unweighted mean over classes}; classes
    with fewer than 2 images are left out (no pair to measure), and "mean" is NaN if none remain.
    """
    if per_class < 2:
        raise ValueError(f"per_class must be >= 2 to form a pair, got {per_class}")
    gen = torch.Generator().manual_seed(seed)
    result: dict[int, float] = {}
    for k in range(ds.num_classes):
        idx = torch.nonzero(ds.labels == k, as_tuple=False).flatten()
        if len(idx) < 2:
            continue
        idx = idx[torch.randperm(len(idx), generator=gen)[:per_class]]
        x = ds.as_float(idx).flatten(1).double()
        d = torch.cdist(x, x)
        m = len(idx)
        # Mean over distinct pairs: the diagonal is zero, so divide the full sum by m(m-1).
        result[k] = float(d.sum() / (m * (m - 1)))
    mean = sum(result.values()) / len(result) if result else math.nan
    return {"per_class": result, "mean": mean}


def diversity_ratio(
    synthetic: ImageDataset, real: ImageDataset, per_class: int = 200, seed: int = 0
) -> float:
    """Synthetic / real within-class distance, over the classes present in both.

    1.0 means as diverse as real data; near 0 means mode collapse. NaN if no class has two
    images in both sets.
    """
    syn = within_class_diversity(synthetic, per_class, seed)["per_class"]
    ref = within_class_diversity(real, per_class, seed)["per_class"]
    common = sorted(set(syn) & set(ref))
    if not common:
        return math.nan
    syn_mean = sum(syn[k] for k in common) / len(common)
    ref_mean = sum(ref[k] for k in common) / len(common)
    if ref_mean == 0.0:
        return math.nan
    return syn_mean / ref_mean
