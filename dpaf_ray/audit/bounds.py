"""The statistics of an audit: from counts of correct guesses to a lower bound on ε.

- `clopper_pearson`: exact binomial confidence interval of a rate.
- `epsilon_from_rates`: (TPR, FPR) of a test with its intervals → ε that no (ε, δ)-DP mechanism
  could stay below. An (ε, δ)-DP mechanism has TPR ≤ e^ε·FPR + δ for every test, so
  ε ≥ log((TPR − δ) / FPR); with the lower end of TPR's interval and the upper end of FPR's, the
  bound holds with the intervals' joint confidence.
- `gaussian_epsilon`: the exact ε(δ) of one unsampled Gaussian mechanism (Balle & Wang 2018), the
  tightest "theory" a single release can be compared with (RDP is looser).
- `one_run_p_value` / `one_run_epsilon`: Steinke, Nasr & Jagielski, "Privacy auditing with one (1)
  training run" (NeurIPS 2023): how many correct guesses about m canaries, each included with
  probability 1/2, an (ε, δ)-DP training run allows.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import optimize, stats


def clopper_pearson(successes: np.ndarray | int, trials: np.ndarray | int,
                    confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided exact interval of a binomial rate; each tail holds (1 − confidence)/2.

    Vectorised over `successes`. With 0 successes the lower end is 0, with all it is 1 above.
    """
    k = np.asarray(successes, dtype=np.float64)
    n = np.asarray(trials, dtype=np.float64)
    a = (1.0 - confidence) / 2.0
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(k > 0, stats.beta.ppf(a, np.maximum(k, 1e-300), n - k + 1), 0.0)
        hi = np.where(k < n, stats.beta.ppf(1 - a, k + 1, np.maximum(n - k, 1e-300)), 1.0)
    return np.nan_to_num(lo, nan=0.0), np.nan_to_num(hi, nan=1.0)


def epsilon_from_rates(tpr_low: np.ndarray | float, fpr_high: np.ndarray | float,
                       delta: float) -> np.ndarray:
    """ε ≥ log((TPR_lo − δ) / FPR_hi), floored at 0 (no evidence is a bound of 0, not a negative one)."""
    t = np.asarray(tpr_low, dtype=np.float64) - delta
    f = np.asarray(fpr_high, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        eps = np.where((t > 0) & (f > 0), np.log(np.maximum(t, 1e-300) / np.maximum(f, 1e-300)), 0.0)
    return np.maximum(eps, 0.0)


def gaussian_delta(epsilon: float, sigma: float) -> float:
    """δ(ε) of the Gaussian mechanism with noise multiplier σ (sensitivity 1), Balle & Wang 2018."""
    a = 1.0 / (2.0 * sigma)
    # Φ(−εσ + a) − e^ε Φ(−εσ − a), the second term in log space so a large ε cannot overflow.
    first = stats.norm.cdf(-epsilon * sigma + a)
    second = math.exp(epsilon + stats.norm.logcdf(-epsilon * sigma - a))
    return float(first - second)


def gaussian_epsilon(sigma: float, delta: float) -> float:
    """The smallest ε with δ(ε) ≤ δ for one unsampled Gaussian release at noise multiplier σ."""
    if sigma <= 0 or not math.isfinite(sigma):
        return math.inf
    if gaussian_delta(0.0, sigma) <= delta:
        return 0.0
    hi = 1.0
    while gaussian_delta(hi, sigma) > delta:
        hi *= 2.0
        if hi > 1e4:
            return math.inf
    return float(optimize.brentq(lambda e: gaussian_delta(e, sigma) - delta, 0.0, hi, xtol=1e-10))


# ---------------------------------------------------------------- one training run (Steinke et al.)


def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] if the run is (ε, δ)-DP w.r.t. each of m canaries.

    Steinke et al. (2023), Theorem 5.2 with its numerical form: the correct guesses are dominated by
    Binomial(r, e^ε/(1+e^ε)) up to a δ term, 2mδ·max_i P[v > Bin ≥ v − i]/i.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    p = 1.0 / (1.0 + math.exp(-epsilon))
    beta = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) >= v]
    if delta > 0 and v > 0:
        i = np.arange(1, v + 1)
        below = np.cumsum(stats.binom.pmf(v - i, r, p))  # P[v > Bin >= v - i]
        alpha = float(np.max(below / i))
        beta += alpha * delta * 2 * m
    return min(beta, 1.0)


def one_run_epsilon(m: int, r: int, v: int, delta: float, alpha: float = 0.05) -> float:
    """The largest ε that the guesses refute at level `alpha` (0 if they refute none)."""
    if r == 0 or one_run_p_value(m, r, v, 0.0, delta) >= alpha:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < alpha:
        lo, hi = hi, hi * 2.0
        if hi > 1e3:
            return lo
    for _ in range(60):  # invariant: p(lo) < alpha <= p(hi)
        mid = (lo + hi) / 2.0
        if one_run_p_value(m, r, v, mid, delta) < alpha:
            lo = mid
        else:
            hi = mid
    return lo
