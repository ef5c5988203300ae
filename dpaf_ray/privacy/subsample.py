"""Tuning on a random subsample, then one final run on all data (issue #14).

After Koskela & Kulkarni, "Practical differentially private hyperparameter tuning with
subsampling" (NeurIPS 2023). The whole accounting of that mode lives in this one file:

    subsample   every record joins independently with probability γ (Poisson), from the secret
    search      trials, scores and repeat-and-select exactly as without a subsample, run on the
                subsample and calibrated to its own target (ε_s, δ_s) (its RDP ledger gives ε_s)
    amplified   the search as a mechanism on the whole data set is (log(1 + γ(e^{ε_s} − 1)), γ·δ_s)-DP
    final       the released knobs trained once on all records, planned at
                ε_f = ε − amplified ε_s, δ_f = δ/2 (its RDP ledger gives ε_f spent)
    total       basic composition: ε = amplified ε_s + ε_f spent, δ = γ·δ_s + δ_f ≤ δ

Amplification (Balle, Barthe & Gaboardi, "Privacy amplification by subsampling: tight analyses
via couplings and divergences", NeurIPS 2018, Poisson subsampling under add/remove-one
neighbours): if M is (ε, δ)-DP then M ∘ Poisson_γ is (log(1 + γ(e^ε − 1)), γδ)-DP. It holds for
any (ε, δ)-DP M, so the search's ε_s can come from its RDP ledger converted at δ_s, whatever the
search does inside (K, repeat-and-select, the noisy scores, the validation split carved out of
the subsample). It needs each record's membership independent of every other record's, which
`data.splits.poisson_subsample` provides (duplicates included).

Basic composition holds adaptively: the final run's knobs are a function of the search's DP
output, and for every choice of knobs the final run is (ε_f, δ_f)-DP. Its budget ε_f is computed
from the search's ledger, which is fixed before any trial runs (data-independent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .ledger import PrivacyConfigError, PrivacyLedger, validate_budget

# The search and the final run split δ equally; the search's δ is further scaled by γ.
SEARCH_DELTA_SHARE = 0.5
# `accounting` of a privacy report written for this mode (`report.recompute` recognises it).
SUBSAMPLED_ACCOUNTING = "subsampled_search_then_final_run"


def check_fraction(fraction: float) -> float:
    if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0 < fraction < 1):
        raise PrivacyConfigError(f"the subsample fraction γ must lie strictly between 0 and 1, got {fraction}")
    return float(fraction)


def amplified_epsilon(epsilon: float, fraction: float) -> float:
    """ε of an ε-DP mechanism run on a Poisson-γ subsample: log(1 + γ(e^ε − 1)) (Balle et al. 2018).

    Computed as log1p(γ·expm1(ε)) so that small ε and small γ keep their precision; for large ε
    (where e^ε overflows) it is ε + log(γ + (1 − γ)e^{−ε}), the same value rewritten."""
    fraction = check_fraction(fraction)
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise PrivacyConfigError(f"ε must be a finite number >= 0, got {epsilon}")
    if epsilon < 700:
        return math.log1p(fraction * math.expm1(epsilon))
    return epsilon + math.log(fraction + (1 - fraction) * math.exp(-epsilon))


def amplified_delta(delta: float, fraction: float) -> float:
    """δ of a (·, δ)-DP mechanism run on a Poisson-γ subsample: γ·δ (Balle et al. 2018)."""
    return check_fraction(fraction) * delta


def unamplified_epsilon(amplified: float, fraction: float) -> float:
    """The ε whose amplified cost is `amplified`: the inverse, log(1 + (e^{ε'} − 1)/γ).

    `amplified_epsilon` is strictly increasing in ε, so this is the largest (and only) ε whose
    amplified cost is at most `amplified`."""
    fraction = check_fraction(fraction)
    if not (amplified >= 0 and math.isfinite(amplified)):
        raise PrivacyConfigError(f"ε must be a finite number >= 0, got {amplified}")
    if amplified < 700:
        return math.log1p(math.expm1(amplified) / fraction)
    return amplified + math.log((1 - math.exp(-amplified)) / fraction + math.exp(-amplified))


@dataclass(frozen=True)
class SubsampleBudget:
    """How (ε, δ) is split between the search on the subsample and the final run on all data."""

    epsilon: float  # the total target ε
    delta: float  # the total δ
    fraction: float  # γ
    epsilon_share: float  # the part of ε the amplified search may spend

    def __post_init__(self) -> None:
        validate_budget(self.epsilon, self.delta)
        check_fraction(self.fraction)
        if not (isinstance(self.epsilon_share, (int, float)) and 0 < self.epsilon_share < 1):
            raise PrivacyConfigError(f"the search's ε share must lie strictly between 0 and 1, got {self.epsilon_share}")

    @property
    def search_epsilon(self) -> float:
        """ε_s: the search's own target on the subsample, whose amplified cost is share·ε."""
        return unamplified_epsilon(self.epsilon_share * self.epsilon, self.fraction)

    @property
    def search_delta(self) -> float:
        """δ_s = δ/2: the search's own δ on the subsample (amplified: γ·δ_s)."""
        return SEARCH_DELTA_SHARE * self.delta

    @property
    def final_delta(self) -> float:
        """δ_f = δ/2: the final run's δ."""
        return (1 - SEARCH_DELTA_SHARE) * self.delta

    def final_epsilon(self, search_ledger: PrivacyLedger) -> float:
        """ε_f: what the final run may spend, the total less the search's amplified spend (from its ledger)."""
        spent = amplified_epsilon(search_ledger.epsilon(self.search_delta), self.fraction)
        left = self.epsilon - spent
        if not left > 0:
            raise PrivacyConfigError(f"the search's amplified ε={spent:.4g} leaves nothing of ε={self.epsilon:g} for "
                                     "the final run; lower subsample.epsilon_share")
        return left

    def to_json(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "epsilon_share": self.epsilon_share,
                "search_target_epsilon": self.search_epsilon, "search_delta": self.search_delta,
                "final_delta": self.final_delta}


def recompute_composed(report: dict[str, Any], delta: float | None = None) -> dict[str, Any]:
    """The total of a report of this mode, recomputed from its two ledgers' events alone."""
    sub = report["subsample"]
    budget = SubsampleBudget(float(report["target_epsilon"]), float(delta if delta is not None else report["delta"]),
                             float(sub["fraction"]), float(sub["epsilon_share"]))
    final = report["final"]
    return composed_privacy(PrivacyLedger.from_json(report["search"]),
                            PrivacyLedger.from_json(final) if final.get("events") else None, budget)


def composed_privacy(search_ledger: PrivacyLedger, final_ledger: PrivacyLedger | None,
                     budget: SubsampleBudget) -> dict[str, Any]:
    """The total (ε, δ) of a subsampled search plus its final run, from the two ledgers alone.

    This is the one place where that total is computed; every ε of this mode that is printed or
    written comes from here. `final_ledger` None (or empty): no final run executed (ε_f = 0, δ_f
    still counted, which only over-states δ)."""
    gamma = budget.fraction
    eps_s = search_ledger.epsilon(budget.search_delta)
    search = {"epsilon": eps_s, "delta": budget.search_delta,
              "amplified_epsilon": amplified_epsilon(eps_s, gamma),
              "amplified_delta": amplified_delta(budget.search_delta, gamma),
              "on": f"a Poisson subsample at rate γ = {gamma:g} of the training records"}
    eps_f = final_ledger.epsilon(budget.final_delta) if final_ledger is not None and final_ledger.entries else 0.0
    final = {"epsilon": eps_f, "delta": budget.final_delta, "on": "all training records"}
    total_eps = search["amplified_epsilon"] + eps_f
    total_delta = search["amplified_delta"] + budget.final_delta
    return {
        "epsilon": total_eps, "delta": total_delta,
        "composition": ("basic (ε, δ) composition of the amplified search and the final run: "
                        f"ε = {search['amplified_epsilon']:.6g} + {eps_f:.6g} = {total_eps:.6g}, "
                        f"δ = γ·δ_s + δ_f = {gamma:g}·{budget.search_delta:g} + {budget.final_delta:g} "
                        f"= {total_delta:g}"),
        "amplification": ("Poisson subsampling at rate γ of an (ε_s, δ_s)-DP search (add/remove one record; "
                          "Balle, Barthe & Gaboardi 2018): (log(1 + γ(e^ε_s − 1)), γ·δ_s)-DP"),
        "search": search, "final": final,
    }
