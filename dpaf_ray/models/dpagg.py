"""DPAGG: the private feature-aggregation layer (docs/design.md §3 rules 1–5).

Records are bounded to v_i = [clip(e_i, C_agg), κ·onehot(y_i)] (norm ≤ Δ), summed per
group, and released with N(0, σ_agg²Δ²) noise. Everything downstream reads only the
released sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from ..collectives import Collective
from ..privacy.mechanisms import clip_rows, gaussian_release
from ..privacy.randomness import KeyedStream

@dataclass(frozen=True)
class DPAggSpec:
    """Public constants of the aggregation: class-pure groups, `groups_per_class` of them per class."""

    num_classes: int
    embedding_dim: int
    clip_norm: float  # C_agg
    kappa: float  # weight of the one-hot label block
    sigma: float  # σ_agg
    groups_per_class: int
    expected_group_size: float  # public; scales ∂L/∂A and floors the noisy count

    @property
    def sensitivity(self) -> float:
        return math.sqrt(self.clip_norm ** 2 + self.kappa ** 2)

    @property
    def num_groups(self) -> int:
        return self.num_classes * self.groups_per_class

    @property
    def noise_std(self) -> float:
        return self.sigma * self.sensitivity

    def group_classes(self) -> torch.Tensor:
        """Class of each class-pure group (public)."""
        return torch.arange(self.num_groups) // self.groups_per_class


def assign_groups(labels: torch.Tensor, own_uniforms: torch.Tensor, spec: DPAggSpec) -> torch.Tensor:
    """Rule 1: a record's group depends only on its own label and its own random draw."""
    sub = (own_uniforms * spec.groups_per_class).long().clamp(max=spec.groups_per_class - 1)
    return labels * spec.groups_per_class + sub


def bound_records(embedding: torch.Tensor, labels: torch.Tensor, spec: DPAggSpec) -> torch.Tensor:
    """Rule 2: v_i = [clip(e_i, C_agg), κ·onehot(y_i)], so ||v_i|| ≤ Δ."""
    clipped = clip_rows(embedding, spec.clip_norm)
    classes = torch.arange(spec.num_classes, device=labels.device)
    onehot = (labels.unsqueeze(-1) == classes).to(embedding.dtype) * spec.kappa  # vmap-safe one-hot
    return torch.cat([clipped, onehot], dim=1)


def group_sums(v: torch.Tensor, groups: torch.Tensor, num_groups: int) -> torch.Tensor:
    out = torch.zeros(num_groups, v.shape[1], dtype=v.dtype, device=v.device)
    return out.index_add(0, groups, v)


def release(local_sums: torch.Tensor, spec: DPAggSpec, noise: KeyedStream, collective: Collective) -> torch.Tensor:
    """Rule 3: all groups at once, one Gaussian mechanism of L2 sensitivity Δ."""
    return gaussian_release([local_sums], spec.noise_std, noise, collective)[0]


def normalise(released: torch.Tensor, spec: DPAggSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Rule 4: group means and class weights computed from the release only.

    Returns (means (μ, m), class_weights (μ, K)). The noisy count is floored at a
    public fraction of the expected group size so that a tiny noisy count cannot blow
    up a mean.
    """
    m = spec.embedding_dim
    feats, hist = released[:, :m], released[:, m:] / spec.kappa
    cls = spec.group_classes().to(released.device)
    counts = hist.gather(1, cls.view(-1, 1)).squeeze(1)
    weights = F.one_hot(cls, spec.num_classes).to(released.dtype)
    floor = max(1.0, 0.25 * spec.expected_group_size)
    means = feats / counts.clamp(min=floor).unsqueeze(1)
    return means, weights
