"""The pre-flight: refuse, before anything is charged, a plan that is measured not to learn.

A spent budget cannot be bought back, so a plan whose noise drowns the signal (or whose T,
derived from a time budget, is too short to train G) is refused with the fixes that would
pass, in numbers; `--force` trains it anyway. Every input is public (the budget, N, the
knobs, the probe's speed on generated data), so the check costs no privacy. The thresholds:

- σ_agg/b ≤ NOISY_GROUP_MEAN (0.05) and the label classifier's noise limits: the planner's
  own warnings (`TrainingPlan.warnings`), each measured there.
- σ_agg/(B/(K·g)) ≤ NOISY_CLASS_GROUP_MEAN: the noise on one class group's mean over its
  expected records (g groups per class), which also catches many classes in a small batch.
- T ≥ MIN_TIME_BUDGET_ITERATIONS when T comes from --time-budget-minutes (an explicit
  --iterations or --epochs is the user's own choice).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

from ..config import ConfigError, TrainConfig
from ..privacy.ledger import PrivacyConfigError
from .plan import NOISY_GROUP_MEAN, TIME_RESERVE_FRACTION, TIME_RESERVE_SECONDS, TrainingPlan, plan_training

# σ_agg·C_agg over the expected records of one class group, in units of C_agg. It equals σ_agg/b × b/(B/K)
# = 5 × NOISY_GROUP_MEAN at the measured defaults (B = 256, b = 128, K = 10), so it separates the same
# runs: 0.195 trained (Fashion-MNIST ε = 0.2, 56.6 %), 0.35 and 0.59 collapsed (mnist-5k ε = 1, 11–16 %).
NOISY_CLASS_GROUP_MEAN = 0.25
# The shortest T a time budget may plan: tune.py trials of T = 400 released 64.8–77.8 % on mnist-5k
# (README), a trial cut at 200 of 400 released mostly unreadable digits, and T = 7 released noise.
MIN_TIME_BUDGET_ITERATIONS = 400


class PreflightError(ConfigError):
    """A plan refused before anything was charged; the message names the fixes."""


def class_group_noise(cfg: TrainConfig, num_classes: int) -> float | None:
    """σ_agg over the expected records of one class group (DPAF), else None."""
    if cfg.model != "dpaf" or cfg.sigma_agg is None:
        return None
    per_class = max(1, round(cfg.batch_size / (cfg.group_size * num_classes)))
    return cfg.sigma_agg / (cfg.batch_size / (num_classes * per_class))


def noise_problems(plan: TrainingPlan, num_classes: int) -> list[str]:
    """Why this plan's noise is measured to drown what G learns from (empty: it can learn)."""
    out = list(plan.warnings)
    noise = class_group_noise(plan.config, num_classes)
    if noise is not None and noise > NOISY_CLASS_GROUP_MEAN and plan.config.sigma_agg / plan.config.group_size \
            <= NOISY_GROUP_MEAN:
        c = plan.config
        out.append(f"DPAGG's noise on one class group's mean, σ_agg/(B/K) = {c.sigma_agg:.3g}/"
                   f"{c.batch_size / num_classes:.3g} = {noise:.3f} with K = {num_classes} classes, is past "
                   f"{NOISY_CLASS_GROUP_MEAN:g} (measured: 0.35 collapsed on mnist-5k at ε = 1; 0.195 trained)")
    return out


def preflight(plan: TrainingPlan, n_train: float, num_classes: int, image_size: int,
              validation_fraction: float) -> None:
    """Raise PreflightError, naming the fixes with numbers, where the plan cannot learn."""
    cfg = plan.config
    problems = noise_problems(plan, num_classes)
    fixes: list[str] = []
    from_time = cfg.time_budget_minutes is not None and plan.how.startswith("--time-budget-minutes")
    T = plan.iterations - plan.schedule.prefix_iterations
    if from_time and T < MIN_TIME_BUDGET_ITERATIONS:
        problems.append(f"--time-budget-minutes {cfg.time_budget_minutes:g} leaves time for T = {T} iterations, "
                        f"fewer than the {MIN_TIME_BUDGET_ITERATIONS} measured to train G (T = 200 released mostly "
                        "unreadable images)")
        if plan.seconds_per_iteration is not None:
            outside = TIME_RESERVE_SECONDS if plan.overhead_seconds is None else plan.overhead_seconds
            seconds = MIN_TIME_BUDGET_ITERATIONS * plan.seconds_per_iteration + outside
            minutes = math.ceil(seconds / (1 - TIME_RESERVE_FRACTION) / 60)
            fixes.append(f"--time-budget-minutes {minutes}")
        fixes.append(f"--iterations {MIN_TIME_BUDGET_ITERATIONS}")
    elif problems:
        fixes = noise_fixes(plan, n_train, num_classes, image_size, validation_fraction)
    if not problems:
        return
    lines = "; ".join(problems)
    fix = ", or ".join(fixes) if fixes else "none found by changing ε, N or T alone; see the knobs named above"
    raise PreflightError(f"refused before anything was charged: this plan is measured not to learn, so its budget "
                         f"would be spent on noise. {lines}. Fixes: {fix}. --force trains it anyway")


def noise_fixes(plan: TrainingPlan, n_train: float, num_classes: int, image_size: int,
                validation_fraction: float) -> list[str]:
    """The smallest ε, the fewest records and the longest T ≥ MIN_TIME_BUDGET_ITERATIONS (noise
    from the budget) at which the noise rules pass, each with the other two as planned."""
    cfg = plan.config
    T = plan.iterations - plan.schedule.prefix_iterations
    fixed_noise = "noise as given" in plan.how or "at the given noise" in plan.how
    base = dataclasses.replace(cfg, iterations=T, epochs=None, time_budget_minutes=None, max_iterations=None,
                               sigma_agg=None, sigma_sgd=None)  # the noise from the budget, as planned

    def learns(c: TrainConfig, n: float) -> bool:
        try:
            return not noise_problems(plan_training(c, n, image_size), num_classes)
        except (ConfigError, PrivacyConfigError):
            return False

    fixes = []
    if not fixed_noise:
        eps = _smallest(lambda e: learns(dataclasses.replace(base, epsilon=e), n_train), cfg.epsilon, 1000.0)
        if eps is not None:
            fixes.append(f"--epsilon {_nice(eps)} (or more)")
        n = _smallest(lambda m: learns(base, m), n_train, 1000 * n_train)
        if n is not None:
            records = _nice(n / (1 - validation_fraction))
            fixes.append(f"≥ {records:,} records (this data set has {n_train / (1 - validation_fraction):,.0f})")
        if T > MIN_TIME_BUDGET_ITERATIONS and learns(dataclasses.replace(base, iterations=MIN_TIME_BUDGET_ITERATIONS),
                                                     n_train):
            longest = _largest(lambda t: learns(dataclasses.replace(base, iterations=int(t)), n_train),
                               MIN_TIME_BUDGET_ITERATIONS, T)
            fixes.append(f"--iterations {int(_nice(longest, down=True))}")
    elif cfg.model == "dpaf" and cfg.sigma_agg is not None:
        limit = min(NOISY_GROUP_MEAN * cfg.group_size,
                    NOISY_CLASS_GROUP_MEAN * cfg.batch_size / num_classes)
        fixes.append(f"--sigma-agg {_nice(limit, down=True):g} (or less; T then comes from the budget)")
    return fixes


def _smallest(ok: Callable[[float], bool], lo: float, hi: float, steps: int = 6) -> float | None:
    """The smallest x in (lo, hi] with ok(x), for ok monotone in x, on a log scale; None if not even hi."""
    if not ok(hi):
        return None
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    return hi


def _largest(ok: Callable[[float], bool], lo: float, hi: float, steps: int = 6) -> float:
    """The largest x in [lo, hi) with ok(x), given ok(lo), for ok decreasing in x."""
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _nice(x: float, down: bool = False) -> float:
    """x rounded up (or down) to two significant digits, so a fix reads '6,000 records', not '5,871.3'."""
    if x <= 0:
        return x
    scale = 10 ** (math.floor(math.log10(x)) - 1)
    v = (math.floor(x / scale + 1e-9) if down else math.ceil(x / scale - 1e-9)) * scale
    return int(v) if v >= 10 else round(v, 10)
