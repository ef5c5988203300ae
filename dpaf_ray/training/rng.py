"""Public random streams keyed by (public seed, stream, iteration).

Only public randomness comes from here: model initialisation and generated codes
(latents, labels and group draws of generated records). Every private draw (Poisson
samples, noise, the split) comes from the run secret in `privacy.randomness`.

Every draw of iteration t comes from a generator seeded by (seed, stream, t), never from
a running state, so W = 1 and W = 2 workers draw the same numbers and a restored run
needs no RNG state.
"""
from __future__ import annotations

import hashlib

import torch


def public_stream(seed: int, name: str, iteration: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}:{name}:{iteration}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
