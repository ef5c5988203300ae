"""Sums across workers. In-process training uses the identity; Ray Train workers use
torch.distributed (gloo on CPU, NCCL on GPU)."""
from __future__ import annotations

from typing import Protocol

import torch


class Collective(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...


class LocalCollective:
    """One process holds all the data: every sum is already global."""

    rank = 0
    world_size = 1

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class TorchDistributedCollective:
    """All-reduce (SUM) over the default process group that Ray Train sets up."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.contiguous().clone()
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM)
        return out


def all_reduce_many(collective: Collective, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """One all-reduce for many tensors (fewer round trips than one each)."""
    if collective.world_size == 1:
        return tensors
    flat = collective.all_reduce_sum(torch.cat([t.reshape(-1) for t in tensors]))
    out, i = [], 0
    for t in tensors:
        out.append(flat[i:i + t.numel()].view_as(t))
        i += t.numel()
    return out
