"""The audit's public knobs, kept free of heavy imports so that the command line can show its
defaults without loading torch."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MECHANISMS = ("dpagg_group_sums", "dpsgd_conv2", "noisy_score")


@dataclass(frozen=True)
class ReleaseAuditSettings:
    """Public knobs of the audit. σ = 1.5 puts one release's ε at 2.75 (δ = 1e-5), which 8·10⁶
    trials per side measure to 0.84–0.94× (4·10⁶: 0.80–0.90×; see docs/audit.md,
    "Measured"). The ε of a release does not change its code path, so one σ serves every mechanism."""

    sigma: float = 1.5  # noise multiplier of every audited release
    delta: float = 1e-5  # the run's δ
    trials: int = 8_000_000  # per side, vectorised stage B
    real_trials: int = 200  # per side, full real path (stage A)
    calibration_fraction: float = 0.2
    confidence: float = 0.95
    world_size: int = 1  # ranks of the DPAGG release
    clip_agg: float = 1.0
    kappa: float = 1.0
    clip_sgd: float = 1.0
    noise_check_level: float = 1e-6  # p-value below which the real path "adds less noise than replayed"
    chunk: int = 1 << 20  # trials per call of the release function in stage B


GUESS_FRACTIONS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5)  # k/m on each side, fixed before the run


@dataclass(frozen=True)
class RunAuditSettings:
    """One audited run: the plan for (ε, δ) on `dataset` gives T, q and the noise, as for training."""

    dataset: str = "mnist-5k"
    epsilon: float = 10.0
    delta: float = 1e-5
    canaries: int = 1000
    sigma_agg: float | None = None  # None: TrainConfig's default
    sigma_sgd: float | None = None
    max_iterations: int | None = None
    max_records: int | None = None  # use only the first records of the data set (tests)
    seed: int = 0  # public: initialisation, canary directions
    guess_fractions: tuple[float, ...] = GUESS_FRACTIONS
    confidence: float = 0.95
    config: dict[str, Any] = field(default_factory=dict)  # further TrainConfig fields (tests: a smaller model)


