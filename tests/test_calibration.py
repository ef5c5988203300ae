"""Rule 12: T (or the noise) is derived from the target (ε, δ): it meets the budget, does not waste
it, and impossible budgets fail with a message that names the option to change."""
from __future__ import annotations

import math
import warnings
from collections import Counter

import pytest
import torch
from PIL import Image

from dpaf_ray.config import ConfigError, TrainConfig
from dpaf_ray.privacy.calibration import (
    IterationSchedule,
    iterations_for_budget,
    noise_scale_for_iterations,
    warn_large_delta,
)
from dpaf_ray.privacy.ledger import PoissonGaussian, PrivacyConfigError, PrivacyLedger
from dpaf_ray.training.plan import plan_training
from dpaf_ray.run import prepare

torch.set_num_threads(1)

DELTA = 1e-5


def ledger_eps(schedule: IterationSchedule, T: int, delta: float = DELTA, extra=()) -> float:
    """ε of what the training loop charges for T iterations (noise_at(i) for each i < T); RDP composes
    additively, so the per-iteration charges are summed per noise multiplier to keep this fast."""
    counts = Counter(schedule.noise_at(i) for i in range(T))
    led = PrivacyLedger(list(extra) + [PoissonGaussian(schedule.sampling_rate, s, c) for s, c in counts.items()])
    return led.epsilon(delta)


@pytest.mark.parametrize("target", [10.0, 3.0])
def test_iterations_for_budget_meets_the_target_and_uses_it(target):
    sched = IterationSchedule.dpsgd(256 / 60000, 1.0)
    T = iterations_for_budget(sched, target, DELTA)
    assert T > 1
    e_T, e_next = ledger_eps(sched, T), ledger_eps(sched, T + 1)
    assert e_T <= target
    assert e_next > target  # T is the largest: one more iteration breaks the budget
    assert e_T >= 0.99 * target


def test_iterations_for_budget_dpaf_cycle_and_extra_releases():
    sched = IterationSchedule.dpaf(0.05, sigma_agg=2.0, sigma_sgd=1.5, sgd_every=3)
    assert sched.cycle[0] == pytest.approx((2.0 ** -2 + 1.5 ** -2) ** -0.5) and sched.cycle[1:] == (2.0, 2.0)
    T = iterations_for_budget(sched, 2.0, DELTA)
    assert ledger_eps(sched, T) <= 2.0 < ledger_eps(sched, T + 1)
    # a fixed extra release (e.g. a noisy score) leaves fewer iterations, and the total still fits
    from dpaf_ray.privacy.ledger import Gaussian

    extra = [Gaussian(3.0)]
    T2 = iterations_for_budget(sched, 2.0, DELTA, extra)
    assert T2 < T
    assert ledger_eps(sched, T2, extra=extra) <= 2.0 < ledger_eps(sched, T2 + 1, extra=extra)


@pytest.mark.parametrize("target,T", [(3.0, 2000), (10.0, 20000)])
def test_noise_scale_for_iterations_meets_the_target(target, T):
    sched = IterationSchedule.dpsgd(256 / 60000, 1.0)
    s = noise_scale_for_iterations(sched, T, target, DELTA)
    scaled = sched.scaled(s)
    assert scaled.cycle[0] == pytest.approx(s)
    e = ledger_eps(scaled, T)
    assert e <= target
    assert e >= 0.99 * target
    assert ledger_eps(sched.scaled(s * 0.99), T) > target  # noticeably less noise would overspend


def test_plan_with_iteration_cap_raises_the_noise_to_fit_the_budget():
    cfg = TrainConfig(epsilon=3.0, delta=DELTA, batch_size=64, group_size=32, max_iterations=50, seed=0,
                      sigma_agg=2.0, sigma_sgd=1.0)  # explicit noise: T from the budget, capped
    plan = plan_training(cfg, 6000)
    assert plan.iterations == 50
    # T from the budget exceeds the cap, so the noise is lowered until the capped run spends the budget
    assert plan.noise_factor < 1
    assert plan.config.sigma_agg == pytest.approx(cfg.sigma_agg * plan.noise_factor)
    assert plan.config.sigma_sgd == pytest.approx(cfg.sigma_sgd * plan.noise_factor)
    assert 0.99 * 3.0 <= ledger_eps(plan.schedule, 50) <= 3.0


# ------------------------------------------------------------------------ impossible budgets


SCHED = IterationSchedule.dpsgd(0.01, 1.0)


@pytest.mark.parametrize("epsilon,delta,word", [
    (0.0, DELTA, "epsilon"), (-1.0, DELTA, "epsilon"), (math.inf, DELTA, "epsilon"), (math.nan, DELTA, "epsilon"),
    (1.0, 0.0, "delta"), (1.0, -1e-5, "delta"), (1.0, 1.0, "delta"), (1.0, 2.0, "delta"),
])
def test_invalid_budget_is_rejected_with_the_option_named(epsilon, delta, word):
    with pytest.raises(PrivacyConfigError, match=word):
        iterations_for_budget(SCHED, epsilon, delta)
    with pytest.raises(PrivacyConfigError, match=word):
        noise_scale_for_iterations(SCHED, 10, epsilon, delta)
    cfg = TrainConfig(epsilon=epsilon, delta=delta, batch_size=8, group_size=4, seed=0)
    with pytest.raises((ConfigError, PrivacyConfigError), match="--" + word):
        plan_training(cfg, 100)


def test_sampling_rate_above_one_is_rejected():
    with pytest.raises(PrivacyConfigError, match="batch size"):
        IterationSchedule.dpsgd(1.5, 1.0)
    with pytest.raises(PrivacyConfigError, match="sampling rate"):
        IterationSchedule.dpaf(0.0, 1.0, 1.0, 1)
    cfg = TrainConfig(batch_size=200, group_size=4, seed=0)
    with pytest.raises(ConfigError, match="--batch-size"):
        plan_training(cfg, 100)


@pytest.mark.parametrize("kw,word", [({"sigma_agg": 0.0}, "sigma-agg"), ({"sigma_sgd": -1.0}, "sigma-sgd"),
                                     ({"sigma_agg": math.nan}, "sigma-agg")])
def test_non_positive_noise_is_rejected(kw, word):
    with pytest.raises(PrivacyConfigError, match="noise multiplier"):
        IterationSchedule.dpaf(0.01, kw.get("sigma_agg", 1.0), kw.get("sigma_sgd", 1.0), 1)
    with pytest.raises(PrivacyConfigError):
        IterationSchedule.dpsgd(0.01, 0.0)
    cfg = TrainConfig(batch_size=8, group_size=4, seed=0, **kw)
    with pytest.raises(ConfigError, match="--" + word):
        plan_training(cfg, 100)


def test_budget_too_small_for_one_iteration():
    with pytest.raises(PrivacyConfigError, match="--epsilon") as err:
        iterations_for_budget(IterationSchedule.dpsgd(0.5, 0.5), 1e-4, DELTA)
    assert "one iteration" in str(err.value)
    cfg = TrainConfig(epsilon=1e-4, batch_size=50, group_size=4, seed=0)
    with pytest.raises((ConfigError, PrivacyConfigError), match="--epsilon"):
        plan_training(cfg, 100)
    with pytest.raises(PrivacyConfigError, match="iterations"):
        noise_scale_for_iterations(SCHED, 0, 1.0, DELTA)


def test_fixed_iterations_over_budget_is_rejected():
    cfg = TrainConfig(epsilon=0.5, batch_size=50, group_size=4, iterations=10_000, seed=0, sigma_agg=2.0,
                      sigma_sgd=1.0)  # explicit noise: a fixed T over the budget is refused
    with pytest.raises(ConfigError, match="--iterations"):
        plan_training(cfg, 100)


# ---------------------------------------------------------------------- δ above 1/N warns


def test_delta_above_one_over_n_warns():
    with pytest.warns(UserWarning, match="1/N"):
        warn_large_delta(0.01, 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_large_delta(1e-4, 1000)  # below 1/N: silent


def test_prepare_warns_for_delta_above_one_over_n(tmp_path):
    for k in range(2):
        d = tmp_path / "data" / f"class{k}"
        d.mkdir(parents=True)
        for i in range(15):
            Image.new("L", (28, 28), color=(i * 17 + k) % 256).save(d / f"{i}.png")
    base = dict(dataset=str(tmp_path / "data"), batch_size=4, group_size=2, iterations=3, seed=0,
                validation_fraction=0.0)
    with pytest.warns(UserWarning, match="delta"):
        prepare(TrainConfig(delta=0.05, **base))  # N = 30, 1/N ≈ 0.033
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        prepare(TrainConfig(delta=1e-3, **base))
