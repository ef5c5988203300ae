"""Turn a configuration and a budget into an iteration schedule and T (DESIGN rule 12)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config import ConfigError, TrainConfig
from ..privacy.calibration import IterationSchedule, iterations_for_budget, noise_scale_for_iterations
from ..privacy.ledger import Entry, entry_from_json, epsilon_from_rdp, rdp_curve, validate_budget


@dataclass(frozen=True)
class TrainingPlan:
    config: TrainConfig  # with the noise multipliers actually used
    schedule: IterationSchedule
    iterations: int
    planned_epsilon: float  # for information; the report uses the ledger
    noise_factor: float = 1.0  # multiplier applied to the configured σs to fit the cap


def schedule_for(cfg: TrainConfig, n_train: int) -> IterationSchedule:
    q = cfg.sampling_rate(n_train)
    if cfg.model == "dpaf":
        return IterationSchedule.dpaf(q, cfg.sigma_agg, cfg.sigma_sgd, cfg.sgd_every)
    return IterationSchedule.dpsgd(q, cfg.sigma_sgd)


def fixed_releases(cfg: TrainConfig) -> list[Entry]:
    """Releases outside training that the budget must also cover (e.g. a trial's noisy score)."""
    return [entry_from_json(e) for e in cfg.extra_fixed_releases]


def plan_training(cfg: TrainConfig, n_train: int) -> TrainingPlan:
    """T from the budget; if T exceeds the compute cap, lower the noise (data-independently) so that the capped run still spends the budget."""
    validate_budget(cfg.epsilon, cfg.delta)
    cfg.validate(n_train)
    extra = fixed_releases(cfg)
    schedule = schedule_for(cfg, n_train)
    base = rdp_curve(extra) if extra else 0.0

    def eps(s: IterationSchedule, t: int) -> float:
        return epsilon_from_rdp(base + s.rdp(t), cfg.delta)

    if cfg.iterations is not None:
        e = eps(schedule, cfg.iterations)
        if e > cfg.epsilon:
            raise ConfigError(
                f"--iterations {cfg.iterations} would spend ε={e:.3g} > target {cfg.epsilon:g}; "
                "omit --iterations to derive T from the budget, or raise the noise multipliers"
            )
        return TrainingPlan(cfg, schedule, cfg.iterations, e)
    T = iterations_for_budget(schedule, cfg.epsilon, cfg.delta, extra)
    if cfg.max_iterations is not None and T > cfg.max_iterations:
        T = cfg.max_iterations
        factor = noise_scale_for_iterations(schedule, T, cfg.epsilon, cfg.delta, extra)
        cfg = dataclasses.replace(cfg, sigma_agg=cfg.sigma_agg * factor, sigma_sgd=cfg.sigma_sgd * factor)
        schedule = schedule_for(cfg, n_train)
        return TrainingPlan(cfg, schedule, T, eps(schedule, T), noise_factor=factor)
    return TrainingPlan(cfg, schedule, T, eps(schedule, T))
