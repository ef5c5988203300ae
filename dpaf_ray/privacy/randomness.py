"""Privacy randomness: every Poisson sample, group draw, noise vector, validation split and
noisy score of a run derives from one run secret (docs/design.md rules 13–14).

    RunSecret (256 bits from `secrets`)
      └─ child("split")            keyed hash of each record → its side of the split
      └─ stream("poisson", t)      inclusion and group draws of iteration t
      └─ stream("noise/…", t)      Gaussian noise of each release of iteration t
      └─ child("trial/<id>")       a trial's own secret inside a search

Each (stream name, iteration) gets its own 256-bit key, derived from the secret by keyed
BLAKE2b, so a stream can be recomputed from the secret alone (a restored worker, W = 1 vs
W = 2 agree) and from nothing else. torch's CPU generator is not used for private draws: it
keeps only 32 bits of its seed, few enough to search.

A stream is the keystream of AES-256 in counter mode under that key (OpenSSL through the
`cryptography` package; initial counter block 0, which is safe because no key is ever used for
two streams). AES-256-CTR rather than ChaCha20 (also in OpenSSL, also a PRF-based stream with
a 256-bit key): on every CPU a GPU host has (AES-NI, ARMv8 crypto) it is the faster of the two,
4–8 GB/s per core against 3–6 for ChaCha20 on the development machine, its 128-bit counter never
wraps, and OpenSSL's implementations on such CPUs are constant-time. SHAKE-256, used before,
ran at ≈ 0.5 GB/s and held the GIL; `update_into` releases it while OpenSSL runs (a Python thread
keeps running during a long call: the GIL check of `bench/noise_throughput.py`), so draws made ahead in a
background thread do not stall the training thread.
Expanding uniforms into Gaussians is vectorised torch in float64 (`gaussians_from_words`), on
the device that needs the noise.

Gaussian noise is (Z1 + Z2 + Z3 + Z4)/2 with Z1 … Z4 from four different Box–Muller pairs of
53-bit uniforms, in float64 (Opacus' secure mode with n = 2, after Holohan & Braghin 2021), so
that the low bits of one floating-point sample do not reveal how it was drawn. The cos and sin
outputs of one pair go to two different samples, never to the same one. Poisson inclusion is an
exact comparison of a uniform 64-bit integer with floor(q·2^64): probability within 2^-64 below q.

The secret never reaches an output, log line, Tune metric or report: its `repr` is
redacted and it refuses JSON. It lives in memory and in checkpoints, which are private.
"""
from __future__ import annotations

import hashlib
import math
import secrets

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

SECRET_BYTES = 32  # 256 bits; docs/design.md rule 13 asks for at least 128
_TWO_53 = float(2 ** 53)
_MASK_53 = (1 << 53) - 1
_INT64_MIN = -(1 << 63)
_ZERO_BLOCK = bytes(1 << 20)  # the plaintext whose encryption is the keystream
_COUNTER_ZERO = bytes(16)
_SLACK = 32  # room beyond the bytes asked for, which update_into may require
NORMAL_BLOCK = 8192  # Gaussians per block: the layout of `normal` (and small enough to stay in cache)
if not np.little_endian:  # pragma: no cover - words are read as little-endian int64 views
    raise ImportError("privacy.randomness reads keystream words as little-endian integers; this CPU is big-endian")


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
    """A cryptographic stream (AES-256-CTR keystream under a derived key), read front to back.

    Reads return keystream bytes in order; how a read is split never changes the numbers."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._cipher = Cipher(algorithms.AES(key), modes.CTR(_COUNTER_ZERO)).encryptor()
        self._offset = 0

    def __repr__(self) -> str:
        return "KeyedStream(<redacted>)"

    def __reduce__(self):
        raise TypeError("a keyed stream is not pickled; pickle the run secret (checkpoints only)")

    def reserve(self, n: int) -> None:
        """Kept for callers of the SHAKE-256 stream, which had to compute its output in one go;
        the cipher produces bytes as they are read, so this does nothing."""

    @property
    def offset(self) -> int:
        """Bytes read so far."""
        return self._offset

    def read(self, n: int) -> bytes:
        out = bytearray(n + _SLACK)
        self._fill(memoryview(out), n)
        return bytes(out[:n])

    def _fill(self, buf: memoryview, n: int) -> None:
        """Write the next n keystream bytes into buf, which has _SLACK bytes more room (OpenSSL may
        ask for a block of room beyond what it writes)."""
        done = 0
        while done < n:
            k = min(n - done, len(_ZERO_BLOCK))
            if self._cipher.update_into(memoryview(_ZERO_BLOCK)[:k], buf[done:]) != k:  # pragma: no cover
                raise RuntimeError("the cipher returned fewer keystream bytes than asked for")
            done += k
        self._offset += n

    def words(self, n: int) -> torch.Tensor:
        """The next n little-endian 64-bit words of the stream, as int64 (two's complement)."""
        buf = torch.empty(8 * n + _SLACK, dtype=torch.uint8)
        self._fill(memoryview(buf.numpy()), 8 * n)
        return buf[: 8 * n].view(torch.int64)

    # -- uniforms and Bernoulli draws -------------------------------------------------------
    def uniform_tensor(self, n: int) -> torch.Tensor:
        """n float64 uniforms on [0, 1), multiples of 2^-53 (the top 53 bits of a word)."""
        return uniforms_from_words(self.words(n))

    def bernoulli_tensor(self, n: int, p: float) -> torch.Tensor:
        """n independent bools, each True with probability floor(p·2^64)/2^64: at most p, less by
        under 2^-64 (an exact integer comparison; no floating-point rounding)."""
        return bernoulli_from_words(self.words(n), p)

    def uniform(self, n: int) -> np.ndarray:
        return self.uniform_tensor(n).numpy()

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        return self.bernoulli_tensor(n, p).numpy()

    # -- Gaussians --------------------------------------------------------------------------
    @staticmethod
    def normal_words(n: int) -> int:
        """Words of the stream that `normal(n)` reads: four per sample, the last block rounded up to even."""
        full, rest = divmod(n, NORMAL_BLOCK)
        return 4 * (full * NORMAL_BLOCK + rest + rest % 2)

    def normal_words_tensor(self, n: int) -> torch.Tensor:
        """The words that `normal(n)` turns into n Gaussians (drawn ahead on the host, transformed on the device)."""
        return self.words(self.normal_words(n))

    def normal_tensor(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", std: float = 1.0) -> torch.Tensor:
        """N(0, std²) of `shape`: drawn and scaled in float64 on `device`, then cast to `dtype`."""
        n = int(math.prod(shape))
        device = torch.device(device)
        if device.type == "cpu":
            z = self.normal_float64(n)
        else:  # only the cipher runs on the host; the transform runs where the noise is added
            z = gaussians_from_words(self.normal_words_tensor(n).to(device, non_blocking=True), n)
        return z.mul_(float(std)).to(dtype).view(*shape)

    def normal_float64(self, n: int) -> torch.Tensor:
        """n float64 standard normals on the CPU, block by block (keystream and temporaries stay in
        cache); the same numbers as `gaussians_from_words(self.normal_words_tensor(n), n)`."""
        out = torch.empty(n, dtype=torch.float64)
        work = _BoxMullerWork(min(NORMAL_BLOCK, n + n % 2))
        for start in range(0, n, NORMAL_BLOCK):
            b = min(NORMAL_BLOCK, n - start)
            b += b % 2
            words = work.words[: 4 * b]
            self._fill(memoryview(work.raw.numpy()), 32 * b)
            _box_muller_block(words, out[start: start + b] if start + b <= n else work.tail[:b], work)
            if start + b > n:
                out[start:] = work.tail[: n - start]
        return out

    def normal(self, n: int) -> np.ndarray:
        """n float64 standard normals (see the module docstring)."""
        return self.normal_float64(n).numpy()


def uniforms_from_words(words: torch.Tensor) -> torch.Tensor:
    """Top 53 bits of each word as a float64 uniform on [0, 1)."""
    u = torch.bitwise_right_shift(words, 11).bitwise_and_(_MASK_53)
    return u.to(torch.float64).mul_(1.0 / _TWO_53)


def bernoulli_from_words(words: torch.Tensor, p: float) -> torch.Tensor:
    """Unsigned word < floor(p·2^64). p·2^64 is exact in floating point (a power-of-two scaling),
    so the threshold is exact; the unsigned comparison is a signed one after flipping the top bit."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability must lie in [0, 1], got {p}")
    threshold = math.floor(p * 2.0 ** 64)
    if threshold >= 1 << 64:
        return torch.ones(words.shape, dtype=torch.bool, device=words.device)
    return torch.bitwise_xor(words, _INT64_MIN) < threshold + _INT64_MIN


def gaussians_from_words(words: torch.Tensor, n: int) -> torch.Tensor:
    """n float64 standard normals from `KeyedStream.normal_words(n)` words, on the words' device.

    Blocks of b = NORMAL_BLOCK samples (the last rounded up to even) each read 4b words: 2b words
    for the radii and 2b for the angles of 2b Box–Muller pairs (c_j, s_j) = r_j (cos θ_j, sin θ_j),
    r_j = sqrt(-2 ln u_j) with u_j in (0, 1], θ_j = 2π v_j with v_j in [0, 1) (53-bit uniforms).
    Sample k of a block is (c_k + c_{b+k} + s_k' + s_{b+k'}) / 2 with k' = (k + b/2) mod b: four
    different pairs, and the two outputs of one pair land in different samples."""
    if words.numel() != KeyedStream.normal_words(n):
        raise ValueError(f"{n} normals need {KeyedStream.normal_words(n)} words, got {words.numel()}")
    full, rest = divmod(n, NORMAL_BLOCK)
    b = rest + rest % 2
    if words.device.type != "cpu":  # one batched pass per shape on an accelerator: the same arithmetic
        out = torch.empty(full * NORMAL_BLOCK + b, dtype=torch.float64, device=words.device)
        if full:
            _box_muller_batched(words[: 4 * full * NORMAL_BLOCK].view(full, -1),
                                out[: full * NORMAL_BLOCK].view(full, -1))
        if rest:
            _box_muller_batched(words[4 * full * NORMAL_BLOCK:].view(1, -1), out[full * NORMAL_BLOCK:].view(1, -1))
        return out[:n]
    out = torch.empty(full * NORMAL_BLOCK + b, dtype=torch.float64)
    work = _BoxMullerWork(min(NORMAL_BLOCK, n + n % 2))
    for start in range(0, n, NORMAL_BLOCK):
        size = min(NORMAL_BLOCK, full * NORMAL_BLOCK + b - start)
        _box_muller_block(words[4 * start: 4 * (start + size)], out[start: start + size], work)
    return out[:n]


class _BoxMullerWork:
    """Buffers of one block, reused block after block (fresh buffers would cost page faults)."""

    def __init__(self, b: int) -> None:
        self.raw = torch.empty(32 * b + _SLACK, dtype=torch.uint8)  # keystream of one block
        self.words = self.raw[: 32 * b].view(torch.int64)
        self.ints = torch.empty(4 * b, dtype=torch.int64)
        self.floats = torch.empty(4 * b, dtype=torch.float64)
        self.cos = torch.empty(2 * b, dtype=torch.float64)
        self.tail = torch.empty(b, dtype=torch.float64)


def _box_muller_block(words: torch.Tensor, out: torch.Tensor, work: _BoxMullerWork) -> None:
    """4b words → b samples in `out`, on the CPU, in place in `work`'s buffers."""
    b = out.numel()
    h = b // 2
    u = work.ints[: 4 * b]
    torch.bitwise_right_shift(words, 11, out=u)
    u.bitwise_and_(_MASK_53)  # 53-bit integers
    u[: 2 * b].add_(1)  # radii from (0, 1]: the log never sees 0
    x = work.floats[: 4 * b]
    x.copy_(u)
    r = x[: 2 * b].mul_(1.0 / _TWO_53).log_().mul_(-2.0).sqrt_()
    theta = x[2 * b:].mul_(2.0 * math.pi / _TWO_53)
    c = torch.cos(theta, out=work.cos[: 2 * b]).mul_(r)
    s = theta.sin_().mul_(r)
    torch.add(c[:b], c[b:], out=out)
    out[:h] += s[h:b]
    out[:h] += s[b + h:]
    out[h:] += s[:h]
    out[h:] += s[b: b + h]
    out.mul_(0.5)


def _box_muller_batched(words: torch.Tensor, out: torch.Tensor) -> None:
    """words (m, 4b) → out (m, b): `_box_muller_block` row by row, as whole-tensor ops."""
    b = out.shape[1]
    h = b // 2
    u = torch.bitwise_right_shift(words, 11).bitwise_and_(_MASK_53)
    u[:, : 2 * b].add_(1)
    x = u.to(torch.float64)
    r = x[:, : 2 * b].mul_(1.0 / _TWO_53).log_().mul_(-2.0).sqrt_()
    theta = x[:, 2 * b:].mul_(2.0 * math.pi / _TWO_53)
    c = torch.cos(theta).mul_(r)
    s = theta.sin_().mul_(r)
    torch.add(c[:, :b], c[:, b:], out=out)
    out[:, :h] += s[:, h:b]
    out[:, :h] += s[:, b + h:]
    out[:, h:] += s[:, :h]
    out[:, h:] += s[:, b: b + h]
    out.mul_(0.5)
