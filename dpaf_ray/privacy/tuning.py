"""Privacy of the hyperparameter search itself (DESIGN §6; Papernot & Steinke, ICLR 2022).

Every trial's executed mechanism (training + noisy score) must have an RDP curve at or
below a *reference curve* at every order. Private random search then releases the best
of K runs, K drawn from a truncated negative binomial / logarithmic / Poisson law with a
cryptographic RNG, and is charged `RepeatAndSelectDpEvent(reference, mean, shape)`.
Adaptive search (TPE) with a fixed K is charged as K compositions of the reference.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .calibration import IterationSchedule
from .ledger import (
    RDP_ORDERS,
    Entry,
    Gaussian,
    PoissonGaussian,
    PrivacyConfigError,
    PrivacyLedger,
    RepeatAndSelect,
    epsilon_from_rdp,
    rdp_curve,
    validate_budget,
)



def tuning_orders(epsilon: float, delta: float) -> tuple[float, ...]:
    """The RDP orders used by the search's ledger, and so the only ones where dominance is needed.

    The RDP→(ε, δ) conversion at order α costs about log(1/δ)/(α−1), so at a target ε the
    best orders lie near 1 + log(1/δ)/ε; orders far above it never give the best ε, but
    they are where curves with different σ differ most (a σ < 1 curve explodes there). Keeping
    orders up to 2× that value (between 4 and 64) rarely costs ε (the calibration of the
    reference sees the same orders) and lets far more configurations fit. The rule
    depends only on the public (ε, δ).
    """
    cap = min(64.0, max(4.0, 2.0 * (1.0 + math.log(1.0 / delta) / epsilon)))
    return tuple(o for o in RDP_ORDERS if o <= cap)

DISTRIBUTIONS = {"tnb": None, "logarithmic": 0.0, "geometric": 1.0, "poisson": math.inf}


def distribution_shape(name: str, tnb_shape: float = 1.0) -> float:
    if name not in DISTRIBUTIONS:
        raise PrivacyConfigError(f"--trials-distribution must be one of {sorted(DISTRIBUTIONS)}, got {name!r}")
    shape = DISTRIBUTIONS[name]
    if shape is None:
        if not (tnb_shape > 0 and math.isfinite(tnb_shape)):
            raise PrivacyConfigError(f"--tnb-shape must be a finite number > 0, got {tnb_shape}")
        shape = float(tnb_shape)
    return shape


# --- the distribution of K ---------------------------------------------------------------
def tnb_mean(gamma: float, shape: float) -> float:
    """Mean of the truncated negative binomial (shape 0: logarithmic)."""
    if shape == 0:
        return (1 - gamma) / (gamma * math.log(1 / gamma))
    return shape * (1 - gamma) / (gamma * (1 - gamma ** shape))


def tnb_gamma(mean: float, shape: float) -> float:
    """γ ∈ (0, 1) whose truncated negative binomial has the given mean (bisection)."""
    if mean <= 1:
        raise PrivacyConfigError(f"the expected number of trials must be > 1, got {mean}")
    lo, hi = 1e-12, 1 - 1e-12  # mean decreases in γ
    for _ in range(200):
        mid = (lo + hi) / 2
        if tnb_mean(mid, shape) > mean:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def sample_num_trials(mean: float, shape: float, rng: secrets.SystemRandom | None = None) -> int:
    """K by inversion with a cryptographic RNG; never truncated, never re-drawn."""
    rng = rng or secrets.SystemRandom()
    u = rng.random()
    if math.isinf(shape):  # Poisson(mean): K = 0 is possible, and then nothing is released
        k, p = 0, math.exp(-mean)
        cdf = p
        while cdf <= u:
            k += 1
            p *= mean / k
            cdf += p
            if p == 0.0 and k > mean:  # floating-point exhaustion far in the tail
                break
        return k
    gamma = tnb_gamma(mean, shape)
    if shape == 0:
        p = (1 - gamma) / math.log(1 / gamma)
    else:
        p = shape * gamma ** shape * (1 - gamma) / (1 - gamma ** shape)
    k, cdf = 1, p
    while cdf <= u:
        p *= (1 - gamma) * (k + shape) / (k + 1)
        k += 1
        cdf += p
        if p == 0.0:
            break
    return k


# --- the reference curve -------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """A reference mechanism: T Poisson-sampled Gaussians (q, σ) and one noisy score."""

    sampling_rate: float
    noise_multiplier: float
    iterations: int
    score_noise: float | None  # None: the score uses public data (free)
    orders: tuple[float, ...] = RDP_ORDERS

    def entries(self) -> list[Entry]:
        out: list[Entry] = [PoissonGaussian(self.sampling_rate, self.noise_multiplier, self.iterations)]
        if self.score_noise is not None:
            out.append(Gaussian(self.score_noise))
        return out

    def rdp(self) -> np.ndarray:
        return rdp_curve(self.entries(), self.orders)


def search_entries(reference: Reference, search: str, mean: float, shape: float) -> list[Entry]:
    """What the whole search is charged (the release's ledger)."""
    if search == "random":
        return [RepeatAndSelect(tuple(reference.entries()), float(mean), float(shape))]
    if search == "tpe":
        k = int(mean)
        return [PoissonGaussian(reference.sampling_rate, reference.noise_multiplier, reference.iterations * k)] + (
            [Gaussian(reference.score_noise, k)] if reference.score_noise is not None else []
        )
    raise PrivacyConfigError(f"--search must be 'random' or 'tpe', got {search!r}")


def search_epsilon(reference: Reference, search: str, mean: float, shape: float, delta: float) -> float:
    ledger = PrivacyLedger(list(search_entries(reference, search, mean, shape)), reference.orders)
    return ledger.epsilon(delta)


def calibrate_reference(epsilon: float, delta: float, sampling_rate: float, noise_multiplier: float,
                        score_noise: float | None, search: str, mean: float, shape: float,
                        max_iterations: int = 10_000_000) -> Reference:
    """The largest reference T such that the whole search meets (ε, δ)."""
    validate_budget(epsilon, delta)
    orders = tuning_orders(epsilon, delta)

    def ref(t: int) -> Reference:
        return Reference(sampling_rate, noise_multiplier, t, score_noise, orders)

    if search_epsilon(ref(1), search, mean, shape, delta) > epsilon:
        raise PrivacyConfigError(
            f"the budget ε={epsilon:g} is too small for a search with {mean:g} expected trials of even one "
            "iteration each; raise --epsilon, lower --expected-trials, or raise the reference noise"
        )
    lo, hi = 1, 2
    while hi <= max_iterations and search_epsilon(ref(hi), search, mean, shape, delta) <= epsilon:
        lo, hi = hi, hi * 2
    hi = min(hi, max_iterations + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if search_epsilon(ref(mid), search, mean, shape, delta) <= epsilon:
            lo = mid
        else:
            hi = mid
    return ref(lo)


# --- fitting a trial under the reference ----------------------------------------------------
def dominated(curve: np.ndarray, reference: np.ndarray) -> bool:
    """True if `curve` ≤ `reference` at every order (orders the reference excludes are ignored)."""
    finite = np.isfinite(reference)
    return bool(np.all(curve[finite] <= reference[finite] * (1 + 1e-9) + 1e-12))


@dataclass(frozen=True)
class TrialFit:
    iterations: int
    noise_factor: float  # multiplier applied to the sampled σs


def fit_trial(schedule: IterationSchedule, score_noise: float | None, reference: Reference,
              min_iterations: int, max_iterations: int) -> TrialFit:
    """T (and, if needed, a noise factor) so that the trial's curve stays under the reference.

    Data-independent: if the sampled configuration fits more than `max_iterations`
    iterations, its noise is lowered so that `max_iterations` use the reference; if it fits
    fewer than `min_iterations`, its noise is raised until `min_iterations` fit.
    """
    ref = reference.rdp()
    orders = reference.orders
    fixed = rdp_curve([Gaussian(score_noise)], orders) if score_noise is not None else np.zeros(len(orders))

    def fits(s: IterationSchedule, t: int) -> bool:
        return dominated(fixed + s.rdp(t, orders), ref)

    def max_t(s: IterationSchedule) -> int:
        if not fits(s, 1):
            return 0
        lo, hi = 1, 2
        while hi <= max_iterations and fits(s, hi):
            lo, hi = hi, hi * 2
        if hi > max_iterations:
            return max_iterations + 1 if fits(s, max_iterations + 1) else max(lo, _bisect(fits, s, lo, max_iterations + 1))
        return _bisect(fits, s, lo, hi)

    t = max_t(schedule)
    if min_iterations <= t <= max_iterations:
        return TrialFit(t, 1.0)
    target = max_iterations if t > max_iterations else min_iterations
    lo, hi = (1e-3, 1.0) if t > max_iterations else (1.0, 2.0)
    while not fits(schedule.scaled(hi), target):
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise PrivacyConfigError("no noise level fits this trial under the reference; raise --epsilon")
    while hi / lo > 1.001:  # smallest factor that fits
        mid = math.sqrt(lo * hi)
        if fits(schedule.scaled(mid), target):
            hi = mid
        else:
            lo = mid
    return TrialFit(target, hi)


def _bisect(fits, s: IterationSchedule, lo: int, hi: int) -> int:
    """Largest t in [lo, hi) with fits(s, t), given fits(s, lo) and not fits(s, hi)."""
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(s, mid):
            lo = mid
        else:
            hi = mid
    return lo


def check_trial_under_reference(trial_entries: Sequence[Entry], reference: Reference) -> None:
    """The executed trial must not exceed the reference it was planned under."""
    if not dominated(rdp_curve(trial_entries, reference.orders), reference.rdp()):
        raise RuntimeError("a trial's executed ledger exceeds the reference curve; the search bound would not hold")

