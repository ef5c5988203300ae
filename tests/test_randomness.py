"""The run secret's streams (docs/design.md rule 13, issue #36): what they compute, checked against an
independent computation with `cryptography` and `hashlib`; their law (moments, tails to 5σ,
independence across streams and iterations, exact Bernoulli rates); that no two (secret, stream,
iteration) share output; and that each Gaussian sums four independent Box–Muller draws."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from dpaf_ray.privacy.randomness import NORMAL_BLOCK, KeyedStream, RunSecret, bernoulli_from_words, \
    gaussians_from_words

FIXED_KEY = bytes(range(32))


# ------------------------------------------------------------------ known answers, computed independently


def reference_keystream(secret_key: bytes, name: str, t: int, n: int) -> bytes:
    """The stream as the module docstring specifies it: a BLAKE2b-derived key, AES-256-CTR from counter 0."""
    key = hashlib.blake2b(f"stream:{name}:{t}".encode(), key=secret_key, digest_size=32).digest()
    return Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor().update(bytes(n))


def reference_words(secret_key: bytes, name: str, t: int, n: int) -> list[int]:
    ks = reference_keystream(secret_key, name, t, 8 * n)
    return [int.from_bytes(ks[8 * i: 8 * i + 8], "little") for i in range(n)]


def reference_normals(words: list[int], n: int) -> list[float]:
    """Python floats and `math`, one block (n ≤ NORMAL_BLOCK), as `gaussians_from_words` documents."""
    b = n + n % 2
    h = b // 2
    r = [math.sqrt(-2.0 * math.log(((w >> 11) + 1) / 2 ** 53)) for w in words[: 2 * b]]
    theta = [2.0 * math.pi * (w >> 11) / 2 ** 53 for w in words[2 * b: 4 * b]]
    c = [ri * math.cos(ti) for ri, ti in zip(r, theta)]
    s = [ri * math.sin(ti) for ri, ti in zip(r, theta)]
    return [(c[k] + c[b + k] + s[(k + h) % b] + s[b + (k + h) % b]) / 2 for k in range(n)]


@pytest.mark.parametrize("secret", [RunSecret(FIXED_KEY), RunSecret.from_public_seed(0)],
                         ids=["fixed-key", "reproducible-seed"])
def test_streams_are_the_documented_keystream(secret):
    key = secret.to_checkpoint()["key"]
    if secret.reproducible:  # --reproducible-noise: the key is a public function of the seed
        assert key == hashlib.sha256(b"dpaf-ray reproducible noise:0").digest()
    s = secret.stream("noise/kat", 3)
    assert s.read(5) + s.read(35) == reference_keystream(key, "noise/kat", 3, 40)  # split reads: one stream

    words = reference_words(key, "poisson", 7, 16)
    assert secret.stream("poisson", 7).uniform(16).tolist() == [(w >> 11) / 2 ** 53 for w in words]
    for p in (0.0123, 0.5, 0.75, 1 - 2 ** -53):
        threshold = math.floor(p * 2 ** 64)
        assert secret.stream("poisson", 7).bernoulli(16, p).tolist() == [w < threshold for w in words]

    for n in (1, 5, 8):
        expected = reference_normals(reference_words(key, "noise/kat", 3, KeyedStream.normal_words(n)), n)
        got = secret.stream("noise/kat", 3).normal(n)
        assert got.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-14)
        scaled = secret.stream("noise/kat", 3).normal_tensor((n,), dtype=torch.float64, std=2.5)
        assert scaled.tolist() == pytest.approx([2.5 * e for e in expected], rel=1e-12, abs=1e-14)


def test_reads_continue_the_stream_whatever_their_sizes():
    s, t = RunSecret(FIXED_KEY).stream("x", 0), RunSecret(FIXED_KEY).stream("x", 0)
    a = s.uniform(3).tolist() + s.normal(7).tolist() + s.bernoulli(9, 0.3).tolist()
    b = t.uniform(3).tolist()
    b += gaussians_from_words(t.normal_words_tensor(7), 7).tolist()
    b += bernoulli_from_words(t.words(9), 0.3).tolist()
    assert a == b and s.offset == t.offset == 8 * (3 + KeyedStream.normal_words(7) + 9)


def test_cpu_blocks_and_batched_blocks_agree():
    """The on-device path (one batched pass) and the CPU loop compute the same numbers."""
    from dpaf_ray.privacy import randomness

    n = 2 * NORMAL_BLOCK + 5
    words = RunSecret(FIXED_KEY).stream("noise/b", 0).normal_words_tensor(n)
    cpu = gaussians_from_words(words, n)
    batched = torch.empty(2 * NORMAL_BLOCK, dtype=torch.float64)
    randomness._box_muller_batched(words[: 8 * NORMAL_BLOCK].view(2, -1), batched.view(2, -1))
    torch.testing.assert_close(batched, cpu[: 2 * NORMAL_BLOCK], rtol=1e-14, atol=1e-15)
    assert torch.equal(RunSecret(FIXED_KEY).stream("noise/b", 0).normal_float64(n), cpu)


# ------------------------------------------------------------------ each sample: four independent draws


def word_dependencies(n: int) -> list[set[int]]:
    """Which words each of n samples depends on (flip a bit of one word, see which samples move)."""
    words = RunSecret(FIXED_KEY).stream("noise/deps", 0).normal_words_tensor(n)
    base = gaussians_from_words(words, n)
    deps: list[set[int]] = [set() for _ in range(n)]
    for i in range(words.numel()):
        flipped = words.clone()
        flipped[i] ^= 1 << 40
        for k in (base != gaussians_from_words(flipped, n)).nonzero().flatten().tolist():
            deps[k].add(i)
    return deps


@pytest.mark.parametrize("n", [2, 6, 9])
def test_each_sample_sums_four_different_box_muller_pairs(n):
    """Holohan & Braghin's hardening counts independent draws: a sample built from the cos and sin
    of one pair has two, not four. Each sample must read four radii and four angles (four pairs),
    and each word must reach two samples (a pair's cos and sin, in different samples)."""
    deps = word_dependencies(n)
    b = n + n % 2
    for k, d in enumerate(deps):
        radii = {i for i in d if i < 2 * b}
        angles = {i - 2 * b for i in d if i >= 2 * b}
        assert len(radii) == 4 and radii == angles, (k, d)  # four pairs, each with its own radius and angle
    reach = [sum(i in d for d in deps) for i in range(4 * b)]
    assert max(reach) <= 2


# ------------------------------------------------------------------ the law


def test_gaussian_moments():
    n = 2_000_000
    z = torch.from_numpy(RunSecret.from_public_seed(11).stream("noise/moments", 0).normal(n))
    bound = 5 / math.sqrt(n)  # five standard errors
    assert abs(z.mean().item()) < bound
    assert abs(z.pow(2).mean().item() - 1) < bound * math.sqrt(2)
    assert abs(z.pow(3).mean().item()) < bound * math.sqrt(15)
    assert abs(z.pow(4).mean().item() - 3) < bound * math.sqrt(96)  # kurtosis: not a sum of few uniforms


def binomial_bounds(n: int, p: float, z: float = 5.0) -> tuple[float, float]:
    mean, sd = n * p, math.sqrt(n * p * (1 - p))
    return mean - z * sd - 1, mean + z * sd + 1


@pytest.fixture(scope="module")
def many_normals() -> torch.Tensor:
    return RunSecret.from_public_seed(12).stream("noise/tails", 0).normal_float64(1 << 24)


@pytest.mark.parametrize("threshold", [3.0, 4.0, 4.5, 5.0])
def test_gaussian_tails_to_five_sigma(threshold, many_normals):
    """2^24 samples: about 10 beyond 5σ, 1,100 beyond 4σ, each within five binomial standard deviations
    (and at least one beyond 5σ: a generator whose tail stopped short would give none)."""
    z = many_normals
    n = z.numel()
    count = int((z.abs() > threshold).sum())
    p = math.erfc(threshold / math.sqrt(2))
    lo, hi = binomial_bounds(n, p)
    assert max(lo, 1) <= count <= hi, (threshold, count, n * p)


def test_streams_and_iterations_are_uncorrelated():
    n = 1_000_000
    s = RunSecret.from_public_seed(13)
    draws = {(name, t): torch.from_numpy(s.stream(name, t).normal(n))
             for name in ("noise/a", "noise/b") for t in (0, 1)}
    keys = list(draws)
    bound = 5 / math.sqrt(n)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            for f in (lambda x: x, lambda x: x * x - 1):  # linear and second-order dependence
                r = torch.corrcoef(torch.stack([f(draws[a]), f(draws[b])]))[0, 1].item()
                assert abs(r) < bound, (a, b, r)
    z = draws[("noise/a", 0)]
    for lag in (1, 2, NORMAL_BLOCK // 2, NORMAL_BLOCK):  # samples that share pairs sit b/2 apart
        for f in (lambda x: x, lambda x: x * x - 1):
            r = torch.corrcoef(torch.stack([f(z[:-lag]), f(z[lag:])]))[0, 1].item()
            assert abs(r) < bound, (lag, r)


@pytest.mark.parametrize("q", [0.0123, 0.5, 1e-4])
def test_bernoulli_rate_within_a_binomial_bound(q):
    n = 4_000_000
    hits = int(RunSecret.from_public_seed(14).stream("poisson", 0).bernoulli_tensor(n, q).sum())
    lo, hi = binomial_bounds(n, q)
    assert lo <= hits <= hi


def test_bernoulli_is_an_exact_unsigned_comparison():
    """floor(q·2^64) is the threshold, exactly, over all 64 bits (words above 2^63 are negative int64s)."""
    for q in (0.75, 0.25, 0.5 + 2 ** -50, 1e-9):
        t = math.floor(q * 2 ** 64)
        around = [t - 1, t, t + 1, 0, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1]
        words = torch.tensor([w - 2 ** 64 if w >= 2 ** 63 else w for w in around], dtype=torch.int64)
        assert bernoulli_from_words(words, q).tolist() == [w < t for w in around], q
    ones = torch.tensor([-1, 0, 2 ** 63 - 1], dtype=torch.int64)
    assert bernoulli_from_words(ones, 1.0).all() and not bernoulli_from_words(ones, 0.0).any()
    with pytest.raises(ValueError, match="probability"):
        bernoulli_from_words(ones, 1.5)


# ------------------------------------------------------------------ no two streams share output


def test_no_two_streams_iterations_or_secrets_share_output():
    secrets_ = [RunSecret(FIXED_KEY), RunSecret(FIXED_KEY).child("trial/0"), RunSecret(FIXED_KEY).child("trial/1"),
                RunSecret.from_public_seed(0), RunSecret.from_public_seed(1)]
    names = ["poisson", "poisson/classifier", "noise/dpagg/real", "noise/dpagg/fake", "noise/dpsgd/conv2",
             "noise/score"]
    seen: dict[bytes, tuple] = {}
    for i, secret in enumerate(secrets_):
        for name in names:
            for t in range(40):
                head = secret.stream(name, t).read(32)
                assert head not in seen, ((i, name, t), seen.get(head))
                seen[head] = (i, name, t)
    # and the same (secret, stream, iteration) always gives the same stream: recomputable from the secret
    assert RunSecret(FIXED_KEY).stream("noise/dpagg/real", 5).read(32) == \
        RunSecret(bytes(FIXED_KEY)).stream("noise/dpagg/real", 5).read(32)


def test_a_stream_never_repeats_its_own_blocks():
    """A counter that stood still (a reused nonce or key inside one stream) would repeat blocks."""
    data = RunSecret(FIXED_KEY).stream("noise/long", 0).read(1 << 20)
    blocks = {data[i: i + 16] for i in range(0, len(data), 16)}
    assert len(blocks) == len(data) // 16


def test_streams_are_not_picklable_and_say_nothing():
    import pickle

    s = RunSecret(FIXED_KEY).stream("noise/x", 0)
    assert "redacted" in repr(s) and FIXED_KEY.hex() not in repr(s)
    with pytest.raises(TypeError):
        pickle.dumps(s)
