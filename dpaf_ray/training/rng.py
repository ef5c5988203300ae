"""Random streams keyed by (seed, stream, iteration).

Every random draw of iteration t comes from a generator seeded by (seed, stream, t),
never from a running state. So W = 1 and W = 2 workers draw exactly the same
numbers, and a run restored from a checkpoint needs no RNG state.
"""
from __future__ import annotations

import hashlib

import torch


def stream(seed: int, name: str, iteration: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{name}:{iteration}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
