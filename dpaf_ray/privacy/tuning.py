"""Privacy of the hyperparameter search itself (docs/design.md §6; Papernot & Steinke, ICLR 2022).

Every trial's executed mechanism (training + noisy score) must have an RDP curve at or
below a *reference curve* at every order. The reference is the search's planned trial (its
T, q and noise split) with its noise calibrated to the budget, so trials of that shape
spend their share with no slack. Private random search then releases the best
of K runs, K drawn from a truncated negative binomial / logarithmic / Poisson law with a
cryptographic RNG, and is charged `RepeatAndSelectDpEvent(reference, mean, shape)`.
Adaptive search (TPE) with a fixed K is charged as K compositions of the reference.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from .calibration import IterationSchedule, Phase
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
    best orders lie near α* = 1 + log(1/δ)/ε. Orders far from α* never give the search's ε,
    but they are where trials of another shape (another batch size or k) rise above the
    reference, so requiring dominance there wastes the trials' budget. Keeping the orders in
    [0.9·α*, 1.4·α*] (at least three of them) costs the reference about 1–2 % of its ε and lets
    trials of other shapes keep ≥ 90 % of it (bench/tuning_gain.py). Any set of orders gives
    a valid bound; this one depends only on the public (ε, δ).
    """
    star = 1.0 + math.log(1.0 / delta) / epsilon
    lo, hi = 0.9 * star, 1.4 * star
    while True:
        orders = tuple(float(o) for o in RDP_ORDERS if lo <= o <= hi)
        if len(orders) >= 3 or (lo <= RDP_ORDERS[0] and hi >= RDP_ORDERS[-1]):
            return orders
        lo, hi = lo / 1.1, hi * 1.1


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


def num_trials_pmf(mean: float, shape: float) -> Iterator[tuple[int, float]]:
    """(k, P[K = k]) for k = 0 (Poisson) or 1 (TNB) upwards, without end: the law K is drawn from."""
    if math.isinf(shape):  # Poisson(mean): K = 0 is possible, and then nothing is released
        k, p = 0, math.exp(-mean)
        while True:
            yield k, p
            k += 1
            p *= mean / k
    gamma = tnb_gamma(mean, shape)
    if shape == 0:
        p = (1 - gamma) / math.log(1 / gamma)
    else:
        p = shape * gamma ** shape * (1 - gamma) / (1 - gamma ** shape)
    k = 1
    while True:
        yield k, p
        p *= (1 - gamma) * (k + shape) / (k + 1)
        k += 1


def sample_num_trials(mean: float, shape: float, rng: secrets.SystemRandom | None = None) -> int:
    """K by inversion with a cryptographic RNG; never truncated, never re-drawn."""
    rng = rng or secrets.SystemRandom()
    u = rng.random()
    cdf = 0.0
    for k, p in num_trials_pmf(mean, shape):
        cdf += p
        if cdf > u or (p == 0.0 and k > mean):  # the latter: floating-point exhaustion far in the tail
            return k
    raise AssertionError("unreachable")


# --- the reference curve -------------------------------------------------------------------
@dataclass(frozen=True)
class Reference:
    """The reference mechanism every trial must stay under, shaped like the search's planned
    trial: `iterations` iterations of `schedule` (its q, its cycle of σ_eff/σ_agg) and one noisy
    score. Its noise is calibrated so that the whole search meets (ε, δ); a trial of the same
    shape then fits under it with no slack (issue #14)."""

    schedule: IterationSchedule
    iterations: int
    score_noise: float | None  # None: the score uses public data (free)
    orders: tuple[float, ...] = RDP_ORDERS

    @property
    def sampling_rate(self) -> float:
        return self.schedule.sampling_rate

    @property
    def noise_multiplier(self) -> float:
        """σ of the first iteration of the cycle (σ_eff for DPAF), for display."""
        return self.schedule.cycle[0]

    def entries(self) -> list[Entry]:
        out: list[Entry] = list(self.schedule.entries(self.iterations))
        if self.score_noise is not None:
            out.append(Gaussian(self.score_noise))
        return out

    def rdp(self) -> np.ndarray:
        return rdp_curve(self.entries(), self.orders)

    def epsilon(self, delta: float) -> float:
        """ε of one run of the reference on its own."""
        return PrivacyLedger(self.entries(), self.orders).epsilon(delta)

    @property
    def gan_iterations(self) -> int:
        """The planned trial's iterations after its classifier phase (`iterations` counts both)."""
        return self.iterations - self.schedule.prefix_iterations

    def to_json(self) -> dict:
        """Recomputable by anyone: `events` in the privacy report's format. `prefix` holds a
        classifier phase's (q_c, σ_c, steps), run before the cycle and counted in `iterations`."""
        return {"events": [e.to_json() for e in self.entries()], "orders": list(self.orders),
                "sampling_rate": self.sampling_rate, "cycle": list(self.schedule.cycle),
                "prefix": [[p.sampling_rate, p.noise, p.iterations] for p in self.schedule.prefix],
                "iterations": self.iterations, "score_noise_multiplier": self.score_noise}

    @classmethod
    def from_json(cls, d: dict) -> "Reference":
        prefix = tuple(Phase(float(q), float(s), int(n)) for q, s, n in d.get("prefix", []))
        return cls(IterationSchedule(float(d["sampling_rate"]), tuple(float(x) for x in d["cycle"]), prefix),
                   int(d["iterations"]), None if d["score_noise_multiplier"] is None else
                   float(d["score_noise_multiplier"]), tuple(float(o) for o in d["orders"]))


def search_entries(reference: Reference, search: str, mean: float, shape: float) -> list[Entry]:
    """What the whole search is charged (the release's ledger)."""
    if search == "random":
        return [RepeatAndSelect(tuple(reference.entries()), float(mean), float(shape))]
    if search == "tpe":
        k = int(mean)
        out: list[Entry] = [PoissonGaussian(e.sampling_rate, e.noise_multiplier, e.count * k)
                            for e in reference.schedule.entries(reference.iterations)]
        if reference.score_noise is not None:
            out.append(Gaussian(reference.score_noise, k))
        return out
    raise PrivacyConfigError(f"--search must be 'random' or 'tpe', got {search!r}")


def search_epsilon(reference: Reference, search: str, mean: float, shape: float, delta: float) -> float:
    ledger = PrivacyLedger(list(search_entries(reference, search, mean, shape)), reference.orders)
    return ledger.epsilon(delta)


def calibrate_reference(epsilon: float, delta: float, schedule: IterationSchedule, iterations: int,
                        score_noise: float | None, search: str, mean: float, shape: float,
                        rel_tol: float = 1e-3, max_noise: float = 1e4) -> Reference:
    """The reference: the planned trial (`schedule` for `iterations`) with the least noise
    (all σs scaled together) such that the whole search meets (ε, δ)."""
    validate_budget(epsilon, delta)
    if iterations < 1:
        raise PrivacyConfigError(f"the trials' planned T must be >= 1, got {iterations}")
    orders = tuning_orders(epsilon, delta)

    def ref(factor: float) -> Reference:
        return Reference(schedule.scaled(factor), iterations, score_noise, orders)

    def fits(factor: float) -> bool:
        return search_epsilon(ref(factor), search, mean, shape, delta) <= epsilon

    lo, hi = 1e-3, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi * schedule.cycle[0] > max_noise:
            raise PrivacyConfigError(
                f"the budget ε={epsilon:g} is too small for a search with {mean:g} expected trials of "
                f"{iterations} iterations each (it would need σ > {max_noise:g}); raise --epsilon, lower "
                "--expected-trials, or plan shorter trials (trial.iterations)")
    if fits(lo):
        return ref(lo)
    while hi / lo > 1 + rel_tol:  # invariant: fits(hi), not fits(lo)
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return ref(hi)


# --- fitting a trial under the reference ----------------------------------------------------
def dominated(curve: np.ndarray, reference: np.ndarray) -> bool:
    """True if `curve` ≤ `reference` at every order (orders the reference excludes are ignored)."""
    finite = np.isfinite(reference)
    return bool(np.all(curve[finite] <= reference[finite] * (1 + 1e-9) + 1e-12))


@dataclass(frozen=True)
class TrialFit:
    iterations: int
    noise_factor: float  # multiplier applied to the sampled (or base) σs


def fit_trial(schedule: IterationSchedule, iterations: int, score_noise: float | None, reference: Reference,
              rel_tol: float = 1e-3) -> TrialFit:
    """The least noise (all σs of the sampled configuration scaled together) with which
    `iterations` iterations and the score stay under the reference at every order.

    Data-independent: it depends on the sampled knobs, the planned T and the reference only."""
    ref = reference.rdp()
    orders = reference.orders
    fixed = rdp_curve([Gaussian(score_noise)], orders) if score_noise is not None else np.zeros(len(orders))
    if not dominated(fixed, ref):
        raise PrivacyConfigError("the trial's noisy score alone exceeds the reference; raise score.noise_multiplier")

    def fits(factor: float) -> bool:
        return dominated(fixed + schedule.scaled(factor).rdp(iterations, orders), ref)

    lo, hi = 1e-3, 1.0
    while not fits(hi):
        lo, hi = hi, hi * 2
        if hi > 1e6:
            raise PrivacyConfigError("no noise level fits this trial under the reference; raise --epsilon")
    if fits(lo):
        return TrialFit(iterations, lo)
    while hi / lo > 1 + rel_tol:  # smallest factor that fits
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return TrialFit(iterations, hi)


def check_trial_under_reference(trial_entries: Sequence[Entry], reference: Reference) -> None:
    """The executed trial must not exceed the reference it was planned under."""
    if not dominated(rdp_curve(trial_entries, reference.orders), reference.rdp()):
        raise RuntimeError("a trial's executed ledger exceeds the reference curve; the search bound would not hold")
