"""Derive the number of iterations (or the noise) from a target (ε, δ) — docs/design.md rule 12.

The plan here only decides how long to train; the ε that is reported always comes
from the ledger of what was executed.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .ledger import (
    RDP_ORDERS,
    Entry,
    PoissonGaussian,
    PrivacyConfigError,
    effective_noise_multiplier,
    epsilon_from_rdp,
    rdp_curve,
    validate_budget,
)


@dataclass(frozen=True)
class Phase:
    """A fixed number of Poisson-sampled Gaussian releases run before the cycle, on their own
    Poisson samples at their own rate (e.g. the DP-SGD label-classifier phase)."""

    sampling_rate: float
    noise: float
    iterations: int


@dataclass(frozen=True)
class IterationSchedule:
    """The private release of each iteration: an optional prefix of phases, then a repeating
    cycle of noise multipliers at `sampling_rate`.

    DPAF with conv2 updated every k-th iteration: (σ_eff, σ_agg, …, σ_agg) of length k.
    The DP-SGD GAN baseline: (σ_sgd,). With a label-classifier phase, iterations
    0 … P−1 release the classifier's DP-SGD update at (q_c, σ_c) and the cycle starts at P.
    """

    sampling_rate: float
    cycle: tuple[float, ...]
    prefix: tuple[Phase, ...] = ()

    def __post_init__(self) -> None:
        for q in (self.sampling_rate, *(p.sampling_rate for p in self.prefix)):
            if not (0 < q <= 1):
                raise PrivacyConfigError(
                    f"sampling rate q = B/N must lie in (0, 1], got {q}; "
                    "lower the batch size B (or --classifier-batch) or use more data"
                )
        for s in (*self.cycle, *(p.noise for p in self.prefix)):
            if not (s > 0 and math.isfinite(s)):
                raise PrivacyConfigError(f"noise multipliers must be > 0, got {s}; pass e.g. --sigma-agg 1.0")
        for p in self.prefix:
            if int(p.iterations) < 0:
                raise PrivacyConfigError(f"a phase needs >= 0 iterations, got {p.iterations}")

    @property
    def prefix_iterations(self) -> int:
        return sum(p.iterations for p in self.prefix)

    @property
    def largest_noise(self) -> float:
        return max((*self.cycle, *(p.noise for p in self.prefix)))

    def release_at(self, iteration: int) -> tuple[float, float]:
        """(q, σ) of the Poisson-sampled Gaussian that iteration `iteration` releases."""
        i = iteration
        for p in self.prefix:
            if i < p.iterations:
                return p.sampling_rate, p.noise
            i -= p.iterations
        return self.sampling_rate, self.cycle[i % len(self.cycle)]

    def with_prefix(self, *phases: Phase) -> "IterationSchedule":
        return IterationSchedule(self.sampling_rate, self.cycle, tuple(p for p in phases if p.iterations > 0))

    @classmethod
    def dpaf(cls, sampling_rate: float, sigma_agg: float, sigma_sgd: float, sgd_every: int) -> "IterationSchedule":
        if sgd_every < 1:
            raise PrivacyConfigError(f"k (conv2 update period) must be >= 1, got {sgd_every}")
        if sigma_agg <= 0 or sigma_sgd <= 0:
            raise PrivacyConfigError(
                f"noise multipliers must be > 0, got σ_agg={sigma_agg}, σ_sgd={sigma_sgd}"
            )
        eff = effective_noise_multiplier(sigma_agg, sigma_sgd)
        return cls(sampling_rate, (eff,) + (sigma_agg,) * (sgd_every - 1))

    @classmethod
    def dpsgd(cls, sampling_rate: float, sigma: float) -> "IterationSchedule":
        return cls(sampling_rate, (sigma,))

    def noise_at(self, iteration: int) -> float:
        return self.release_at(iteration)[1]

    def scaled(self, factor: float) -> "IterationSchedule":
        """Every noise multiplier, the prefix's included, times `factor` (the planner's one knob)."""
        return IterationSchedule(self.sampling_rate, tuple(s * factor for s in self.cycle),
                                 tuple(Phase(p.sampling_rate, p.noise * factor, p.iterations) for p in self.prefix))

    def entries(self, iterations: int) -> list[Entry]:
        """Ledger entries of the first `iterations` iterations (what the ledger will hold)."""
        out: list[Entry] = []
        left = iterations
        for p in self.prefix:
            n = min(max(0, left), p.iterations)
            if n > 0:
                out.append(PoissonGaussian(p.sampling_rate, p.noise, n))
            left -= p.iterations
        left = max(0, left)
        counts: dict[float, int] = {}
        k = len(self.cycle)
        for i, s in enumerate(self.cycle):
            n = max(0, math.ceil((left - i) / k))
            counts[s] = counts.get(s, 0) + n
        return out + [PoissonGaussian(self.sampling_rate, s, n) for s, n in counts.items() if n > 0]

    def rdp(self, iterations: int, orders: Sequence[float] = RDP_ORDERS) -> np.ndarray:
        # RDP composes additively: compute each distinct mechanism once, then scale.
        total = np.zeros(len(orders))
        for e in self.entries(iterations):
            total += e.count * rdp_curve([PoissonGaussian(e.sampling_rate, e.noise_multiplier, 1)], orders)
        return total


def warn_large_delta(delta: float, n_records: int) -> None:
    if n_records > 0 and delta > 1.0 / n_records:
        warnings.warn(
            f"delta = {delta:g} is above 1/N = {1.0 / n_records:g}: a mechanism that publishes one "
            "whole record with probability delta would satisfy this guarantee; use delta < 1/N",
            stacklevel=2,
        )


def iterations_for_budget(
    schedule: IterationSchedule,
    epsilon: float,
    delta: float,
    extra: Sequence[Entry] = (),
    max_iterations: int = 10_000_000,
) -> int:
    """Largest T whose ε (with the `extra` releases, e.g. a noisy score) stays ≤ the target."""
    validate_budget(epsilon, delta)
    base = rdp_curve(extra) if extra else np.zeros(len(RDP_ORDERS))

    def eps(t: int) -> float:
        return epsilon_from_rdp(base + schedule.rdp(t), delta)

    if eps(1) > epsilon:
        raise PrivacyConfigError(
            f"the budget ε={epsilon:g}, δ={delta:g} is too small for even one iteration "
            f"(one iteration costs ε={eps(1):.3g}); raise --epsilon, raise the noise multipliers "
            "or lower the batch size"
        )
    lo, hi = 1, 2
    while hi <= max_iterations and eps(hi) <= epsilon:
        lo, hi = hi, hi * 2
    if hi > max_iterations:
        return max_iterations
    while hi - lo > 1:  # invariant: eps(lo) <= epsilon < eps(hi)
        mid = (lo + hi) // 2
        if eps(mid) <= epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def noise_scale_for_iterations(
    schedule: IterationSchedule,
    iterations: int,
    epsilon: float,
    delta: float,
    extra: Sequence[Entry] = (),
    rel_tol: float = 1e-3,
    max_factor: float = 1e6,
) -> float:
    """Smallest factor s (to rel_tol) such that `schedule.scaled(s)` for T iterations meets (ε, δ).

    Keeps the ratio between the noise multipliers fixed; the caller multiplies them by s.
    """
    validate_budget(epsilon, delta)
    if iterations < 1:
        raise PrivacyConfigError(f"iterations must be >= 1, got {iterations}")
    base = rdp_curve(extra) if extra else np.zeros(len(RDP_ORDERS))
    if epsilon_from_rdp(base, delta) >= epsilon:
        raise PrivacyConfigError(
            f"the fixed releases alone already spend ε >= {epsilon:g}; raise --epsilon"
        )

    def eps(s: float) -> float:
        return epsilon_from_rdp(base + schedule.scaled(s).rdp(iterations), delta)

    lo, hi = 1e-3, 1.0
    while eps(hi) > epsilon:
        lo, hi = hi, hi * 2
        if hi > max_factor:
            raise PrivacyConfigError(f"no noise level up to {max_factor:.3g}× the base meets this budget; "
                                     "raise --epsilon or lower the number of iterations")
    if eps(lo) <= epsilon:
        return lo
    while hi / lo > 1 + rel_tol:
        mid = math.sqrt(lo * hi)
        if eps(mid) <= epsilon:
            hi = mid
        else:
            lo = mid
    return hi
