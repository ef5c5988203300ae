"""The distinguishing test of a release-level audit: a threshold on the projection along the canary.

For a Gaussian release the likelihood ratio between "canary in" and "canary out" is monotone in
the projection of the output on the canary's contribution, so the best tests are thresholds on it.
Which threshold (and which side counts as "positive") is chosen on a calibration part of the
samples; the rates are then counted on the other part, so the Clopper–Pearson intervals are those of
tests fixed in advance, and the bound holds at their confidence.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from .bounds import clopper_pearson, epsilon_from_rates


@dataclass(frozen=True)
class ThresholdTest:
    """The chosen test and what it measured on the evaluation part."""

    threshold: float
    positive_side: int  # 1: "projection > threshold" guesses "canary in"; 0: "≤" guesses "canary out"
    calibration_trials: int  # per side
    evaluation_trials: int  # per side
    confidence: float  # of each interval; the two tests' union bound gives the audit's confidence
    chosen_by: str
    tpr: float
    tpr_interval: tuple[float, float]
    fpr: float
    fpr_interval: tuple[float, float]
    epsilon_lower_bound: float

    def to_json(self) -> dict:
        return asdict(self)


def _bounds_for(pos: np.ndarray, neg: np.ndarray, thresholds: np.ndarray, upper: bool,
                delta: float, confidence: float, as_if: int | None = None) -> tuple[np.ndarray, tuple]:
    """ε bound of every threshold for the test 'x > τ' (upper) or 'x ≤ τ', positives `pos`.

    `as_if`: the intervals of the same rates counted on `as_if` trials per side (used to choose
    the threshold that will do best on the evaluation part, which is larger than the calibration one).
    """
    pos_s, neg_s = np.sort(pos), np.sort(neg)
    above_pos = len(pos_s) - np.searchsorted(pos_s, thresholds, side="right")
    above_neg = len(neg_s) - np.searchsorted(neg_s, thresholds, side="right")
    tp = above_pos if upper else len(pos_s) - above_pos
    fp = above_neg if upper else len(neg_s) - above_neg
    n_pos, n_neg = len(pos_s), len(neg_s)
    if as_if is not None:
        tp, fp = np.round(tp * as_if / n_pos), np.round(fp * as_if / n_neg)
        n_pos = n_neg = as_if
    tpr_lo, tpr_hi = clopper_pearson(tp, n_pos, confidence)
    fpr_lo, fpr_hi = clopper_pearson(fp, n_neg, confidence)
    eps = epsilon_from_rates(tpr_lo, fpr_hi, delta)
    return eps, (tp, fp, tpr_lo, tpr_hi, fpr_lo, fpr_hi)


def _model_choice(cal_out: np.ndarray, cal_in: np.ndarray, n_eval: int, delta: float, confidence: float,
                  candidates: int) -> tuple[float, float, int]:
    """Threshold that a Gaussian fitted to each calibration side says will bound ε best on n_eval trials.

    Fitting uses every calibration sample, so the choice is far steadier than the empirical maximum,
    whose tail counts are few; a wrong fit costs power, never validity (the threshold is fixed before
    the evaluation part is looked at)."""
    m0, s0 = float(np.mean(cal_out)), float(np.std(cal_out)) or 1e-12
    m1, s1 = float(np.mean(cal_in)), float(np.std(cal_in)) or 1e-12
    lo, hi = min(m0, m1) - 10 * max(s0, s1), max(m0, m1) + 10 * max(s0, s1)
    taus = np.linspace(lo, hi, 20 * candidates)
    best = (-1.0, 0.0, 1)
    for positive_side in (1, 0):
        if positive_side == 1:  # "x > τ" ⇒ in
            tp, fp = stats.norm.sf(taus, m1, s1), stats.norm.sf(taus, m0, s0)
        else:  # "x ≤ τ" ⇒ out
            tp, fp = stats.norm.cdf(taus, m0, s0), stats.norm.cdf(taus, m1, s1)
        tpr_lo, _ = clopper_pearson(np.round(tp * n_eval), n_eval, confidence)
        _, fpr_hi = clopper_pearson(np.round(fp * n_eval), n_eval, confidence)
        eps = epsilon_from_rates(tpr_lo, fpr_hi, delta)
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), float(taus[i]), positive_side)
    return best


def _empirical_choice(cal_out: np.ndarray, cal_in: np.ndarray, n_eval: int, delta: float, confidence: float,
                      candidates: int) -> tuple[float, float, int]:
    """Threshold whose calibration rates, counted on n_eval trials, would bound ε best (no model)."""
    pooled = np.concatenate([cal_out, cal_in])
    qs = np.unique(np.concatenate([np.linspace(0.0, 1.0, candidates),
                                   np.geomspace(0.5 / len(pooled), 0.5, candidates // 2),
                                   1.0 - np.geomspace(0.5 / len(pooled), 0.5, candidates // 2)]))
    taus = np.quantile(pooled, np.clip(qs, 0.0, 1.0))
    best = (-1.0, 0.0, 1)
    for positive_side, (pos, neg, upper) in ((1, (cal_in, cal_out, True)), (0, (cal_out, cal_in, False))):
        eps, _ = _bounds_for(pos, neg, taus, upper, delta, confidence, as_if=n_eval)
        i = int(np.argmax(eps))
        if eps[i] > best[0]:
            best = (float(eps[i]), float(taus[i]), positive_side)
    return best


def threshold_test(out_side: np.ndarray, in_side: np.ndarray, delta: float, confidence: float = 0.95,
                   calibration_fraction: float = 0.2, candidates: int = 400) -> ThresholdTest:
    """Lower bound on ε from samples of the projection without (`out_side`) and with the canary.

    Both orientations are considered: "x > τ ⇒ in" bounds the privacy loss of adding the canary,
    "x ≤ τ ⇒ out" that of removing it; add/remove-one DP must bound both. Two tests are fixed on
    the calibration part (one from a Gaussian fit, one from the empirical rates) and both are counted
    on the evaluation part, each at confidence 1 − (1 − confidence)/2, so the better of the two holds
    at `confidence` (Bonferroni).
    """
    out_side, in_side = np.asarray(out_side, np.float64), np.asarray(in_side, np.float64)
    n = min(len(out_side), len(in_side))
    n_cal = max(2, int(round(calibration_fraction * n)))
    if n - n_cal < 1:
        raise ValueError(f"too few trials ({n} per side) for a calibration split")
    cal0, cal1 = out_side[:n_cal], in_side[:n_cal]
    ev0, ev1 = out_side[n_cal:n], in_side[n_cal:n]
    each = 1.0 - (1.0 - confidence) / 2.0
    results = []
    for choose in (_model_choice, _empirical_choice):
        _, tau, positive_side = choose(cal0, cal1, n - n_cal, delta, each, candidates)
        pos, neg, upper = (ev1, ev0, True) if positive_side == 1 else (ev0, ev1, False)
        eps, (tp, fp, tpr_lo, tpr_hi, fpr_lo, fpr_hi) = _bounds_for(pos, neg, np.array([tau]), upper, delta, each)
        results.append(ThresholdTest(
            threshold=tau, positive_side=positive_side, calibration_trials=n_cal, evaluation_trials=n - n_cal,
            confidence=each, tpr=float(tp[0] / len(pos)), tpr_interval=(float(tpr_lo[0]), float(tpr_hi[0])),
            fpr=float(fp[0] / len(neg)), fpr_interval=(float(fpr_lo[0]), float(fpr_hi[0])),
            epsilon_lower_bound=float(eps[0]), chosen_by="gaussian fit" if choose is _model_choice else "empirical",
        ))
    return max(results, key=lambda r: r.epsilon_lower_bound)
