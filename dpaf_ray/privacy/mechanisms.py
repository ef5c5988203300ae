"""Clipping and Gaussian noise: where private values become releasable.

A release is `Σ (bounded per-record values) + N(0, std² I)`, with the noise added
exactly once however many workers hold records (docs/design.md §5): rank 0 adds it to its
local sum before the all-reduce.
"""
from __future__ import annotations

import torch

from ..collectives import Collective, all_reduce_many
from .randomness import KeyedStream


def clip_rows(x: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale each row to L2 norm at most `max_norm` (rows are records)."""
    x = _zero_non_finite(x, torch.isfinite(x.flatten(1)).all(1))
    norms = x.flatten(1).norm(dim=1)
    factor = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return x * factor.view(-1, *([1] * (x.dim() - 1)))


def clip_and_sum_per_record(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Clip each record's whole gradient (all tensors jointly) to `max_norm`, then sum over records.

    `grads[j]` has shape (n, *param_j.shape). With n = 0 the sums are zeros.
    """
    if not grads:
        return []
    n = grads[0].shape[0]
    if n == 0:
        return [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in grads]
    finite = torch.stack([torch.isfinite(g.reshape(n, -1)).all(1) for g in grads]).all(0)
    grads = [_zero_non_finite(g, finite) for g in grads]
    sq = sum(g.reshape(n, -1).pow(2).sum(1) for g in grads)
    factor = (max_norm / (sq.sqrt() + 1e-12)).clamp(max=1.0)
    return [torch.einsum("n,n...->...", factor, g) for g in grads]


def _zero_non_finite(x: torch.Tensor, finite_rows: torch.Tensor) -> torch.Tensor:
    """A record whose values overflowed contributes zero: NaN·0 would otherwise leak its presence."""
    return torch.where(finite_rows.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype))


def gaussian_release(
    local_sums: list[torch.Tensor],
    noise_std: float,
    noise: KeyedStream,
    collective: Collective,
) -> list[torch.Tensor]:
    """Global sum plus N(0, noise_std²) per coordinate, noise drawn once (on rank 0) from a
    stream of the run secret (docs/design.md rule 13)."""
    if collective.rank == 0:
        total = sum(s.numel() for s in local_sums)
        flat = noise.normal_tensor((total,), dtype=local_sums[0].dtype if local_sums else torch.float32,
                                   device=local_sums[0].device if local_sums else "cpu", std=noise_std)
        out, i = [], 0
        for s in local_sums:
            out.append(s + flat[i:i + s.numel()].view_as(s))
            i += s.numel()
        local_sums = out
    return all_reduce_many(collective, local_sums)
