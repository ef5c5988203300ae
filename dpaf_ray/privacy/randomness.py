"""Privacy randomness: every Poisson sample, group draw, noise vector, validation split and
noisy score of a run derives from one run secret (docs/design.md rules 13–14).

    RunSecret (256 bits from `secrets`)
      └─ child("split")            keyed hash of each record → its side of the split
      └─ stream("poisson", t)      inclusion and group draws of iteration t
      └─ stream("noise/…", t)      Gaussian noise of each release of iteration t
      └─ child("trial/<id>")       a trial's own secret inside a search

Streams are SHAKE-256 keyed with a per-(name, iteration) key derived by keyed BLAKE2b, so
a stream can be recomputed from the secret alone (a restored worker, W = 1 vs W = 2 agree)
and from nothing else. torch's CPU generator is not used for private draws: it keeps only
32 bits of its seed, few enough to search.

Gaussian noise is the sum of four Box–Muller normals from 53-bit uniforms, in float64,
divided by two (as Opacus' secure mode does, after Holohan & Braghin 2021), so that the
low bits of one floating-point sample do not reveal how it was drawn.

The secret never reaches an output, log line, Tune metric or report: its `repr` is
redacted and it refuses JSON. It lives in memory and in checkpoints, which are private.
"""
from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
import torch

SECRET_BYTES = 32  # 256 bits; docs/design.md rule 13 asks for at least 128
_TWO_53 = float(2 ** 53)


class RunSecret:
    """A run's (or a search's) secret key. Pickles for Ray transport and checkpoints only."""

    __slots__ = ("_key", "reproducible")

    def __init__(self, key: bytes, reproducible: bool = False) -> None:
        if not isinstance(key, (bytes, bytearray)) or len(key) < 16:
            raise ValueError("a run secret needs at least 128 bits of key")
        self._key = bytes(key)
        self.reproducible = bool(reproducible)

    @classmethod
    def fresh(cls) -> "RunSecret":
        return cls(secrets.token_bytes(SECRET_BYTES))

    @classmethod
    def from_public_seed(cls, seed: int) -> "RunSecret":
        """Tests and benchmarks only (`--reproducible-noise`): anyone who knows the seed can
        replay the noise, so a run made this way is marked as not private."""
        key = hashlib.sha256(f"dpaf-ray reproducible noise:{int(seed)}".encode()).digest()
        return cls(key, reproducible=True)

    def child(self, label: str) -> "RunSecret":
        """An independent secret for a named part of the run (the split, a trial)."""
        key = hashlib.blake2b(b"child:" + label.encode(), key=self._key, digest_size=SECRET_BYTES).digest()
        return RunSecret(key, self.reproducible)

    def stream(self, name: str, iteration: int = 0) -> "KeyedStream":
        key = hashlib.blake2b(f"stream:{name}:{int(iteration)}".encode(), key=self._key,
                              digest_size=SECRET_BYTES).digest()
        return KeyedStream(key)

    def keyed_hash64(self, data: bytes) -> int:
        """A 64-bit keyed hash (record → split side)."""
        return int.from_bytes(hashlib.blake2b(data, key=self._key, digest_size=8).digest(), "little")

    # -- persistence: checkpoints only ------------------------------------------------------
    def to_checkpoint(self) -> dict:
        return {"key": self._key, "reproducible": self.reproducible}

    @classmethod
    def from_checkpoint(cls, state: dict) -> "RunSecret":
        return cls(state["key"], state.get("reproducible", False))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunSecret) and secrets.compare_digest(self._key, other._key)

    def __hash__(self) -> int:  # pragma: no cover - secrets are not dict keys
        raise TypeError("RunSecret is not hashable")

    def __repr__(self) -> str:
        return "RunSecret(<redacted>)" + (" [reproducible: NOT PRIVATE]" if self.reproducible else "")

    __str__ = __repr__

    def __reduce__(self):
        return (RunSecret, (self._key, self.reproducible))

    def __json__(self):  # pragma: no cover - documentation of intent
        raise TypeError("a run secret is never written as JSON")


class KeyedStream:
    """A cryptographic byte stream (SHAKE-256 under a derived key), read front to back."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._offset = 0
        self._buffer = b""  # SHAKE output computed so far (a prefix of the stream)

    def __repr__(self) -> str:
        return "KeyedStream(<redacted>)"

    def reserve(self, n: int) -> None:
        """Compute the next n bytes in one go, so that several reads cost one SHAKE output
        (the bytes are the same either way: every output length extends the same stream)."""
        end = self._offset + n
        if end > len(self._buffer):
            self._buffer = hashlib.shake_256(self._key).digest(end)

    def read(self, n: int) -> bytes:
        end = self._offset + n
        if end > len(self._buffer):
            self._buffer = hashlib.shake_256(self._key).digest(end) if n else self._buffer
        out = self._buffer[self._offset:end] if n else b""
        self._offset = end
        return out

    def _u53(self, n: int) -> np.ndarray:
        """n integers uniform on [0, 2^53)."""
        return np.frombuffer(self.read(8 * n), dtype="<u8") >> np.uint64(11)

    def uniform(self, n: int) -> np.ndarray:
        """n float64 uniforms on [0, 1), multiples of 2^-53."""
        return self._u53(n).astype(np.float64) / _TWO_53

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """n independent draws, each True with probability floor(p·2^53)/2^53 ≤ p (never above)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {p}")
        threshold = np.uint64(math.floor(p * _TWO_53))  # exact: p·2^53 is a power-of-two scaling
        return self._u53(n) < threshold

    def normal(self, n: int) -> np.ndarray:
        """n float64 standard normals: (Z1+Z2+Z3+Z4)/2, each Z by Box–Muller."""
        m = (n + 1) // 2  # Box–Muller pairs per summand
        u = (self._u53(8 * m).astype(np.float64) + 0.5) / _TWO_53  # in (0, 1): log never sees 0
        u1, u2 = u[: 4 * m], u[4 * m:]
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])  # 8m normals
        return z.reshape(4, 2 * m).sum(0)[:n] / 2.0

    def normal_tensor(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", std: float = 1.0) -> torch.Tensor:
        """N(0, std²) of `shape`: scaled in float64, then cast to `dtype` on `device`."""
        n = int(math.prod(shape))
        z = torch.from_numpy(self.normal(n) * float(std)).view(*shape)
        return z.to(device=device, dtype=dtype, non_blocking=True)
