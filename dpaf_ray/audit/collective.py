"""W ranks as threads in one process, with a real SUM all-reduce between them.

The audit runs a release on W = 2 ranks this way so that "noise added once" is checked by running
the release code as the workers run it, without starting Ray or torch.distributed.
"""
from __future__ import annotations

import threading
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


class _Group:
    def __init__(self, world: int) -> None:
        self.world = world
        self.buf: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)


class ThreadCollective:
    """One rank's view of the group (the `Collective` protocol of `dpaf_ray.collectives`)."""

    def __init__(self, group: _Group, rank: int) -> None:
        self.group, self.rank, self.world_size = group, rank, group.world

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        g = self.group
        g.buf[self.rank] = tensor.clone()
        g.barrier.wait()
        total = g.buf[0].clone()
        for other in g.buf[1:]:
            total = total + other
        g.barrier.wait()  # nobody overwrites its buffer before everyone has summed
        return total


def run_ranks(world: int, fn: Callable[[ThreadCollective], T], timeout: float = 600.0) -> list[T]:
    """`fn(collective)` on each of `world` ranks at once; the results in rank order."""
    group = _Group(world)
    results: list = [None] * world
    errors: list[BaseException] = []

    def body(rank: int) -> None:
        try:
            results[rank] = fn(ThreadCollective(group, rank))
        except BaseException as err:  # noqa: BLE001 - re-raised below, in the caller's thread
            errors.append(err)
            group.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    if errors:
        raise errors[0]
    if any(th.is_alive() for th in threads):
        raise TimeoutError(f"a rank did not finish within {timeout} s")
    return results
