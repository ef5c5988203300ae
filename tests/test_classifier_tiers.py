"""The default DP label-classifier phase is a table (training.plan.CLASSIFIER_TIERS, issue #37): the
first tier whose planned σ_c/B_c is within its limit is used, and it sets only the knobs the run left
unset (None), so a value given explicitly is kept even where it equals the default."""
from __future__ import annotations

import dataclasses
import math

import pytest

from dpaf_ray import cli
from dpaf_ray.config import PLANNED_KNOBS, ConfigError, TrainConfig
from dpaf_ray.privacy.ledger import PrivacyConfigError
from dpaf_ray.training import plan as plan_module
from dpaf_ray.training.plan import AUTO_CLASSIFIER_MAX_SAMPLING_RATE, CLASSIFIER_TIERS, ClassifierTier, plan_training

DELTA = 1e-5
FASHION = 0.9 * 60000  # expected training records (1 − f)·N


def test_an_explicit_value_equal_to_the_default_is_kept_by_the_default_plan():
    """At ε = 10 on Fashion-MNIST the 1000-step tier sets every image between two classes (1.0); a run
    that asks for 0.5, the value the plan would otherwise use, keeps it (it used to read as unset)."""
    unset = plan_training(TrainConfig(dataset="fashion-mnist", epsilon=10, delta=DELTA), FASHION)
    assert unset.config.classifier_steps == 1000 and unset.config.between_class_fraction == 1.0
    given = plan_training(TrainConfig(dataset="fashion-mnist", epsilon=10, delta=DELTA, between_class_fraction=0.5),
                          FASHION)
    assert given.config.classifier_steps == 1000 and given.config.between_class_fraction == 0.5
    assert given.config.uncertain_fraction == 0.5  # the tier's other knob, left unset, is still set
    flag = cli.config_from_args(cli.build_parser().parse_args(
        ["train", "--out", "x", "--between-class-fraction", "0.5", "--epsilon", "10"]))
    assert plan_training(flag, FASHION).config.between_class_fraction == 0.5


def test_a_planned_config_holds_a_number_in_every_knob_left_to_the_plan():
    """What the trainer gets and config.json holds: no None, with or without a phase."""
    for kw in ({}, {"epsilon": 0.2}, {"epsilon": 0.05}, {"classifier_steps": 300}, {"iterations": 400},
               {"model": "dpsgd-gan"}):
        planned = plan_training(TrainConfig(**{"dataset": "fashion-mnist", "epsilon": 10, "delta": DELTA, **kw}),
                                FASHION).config
        assert all(isinstance(getattr(planned, k), (int, float)) for k in PLANNED_KNOBS), (kw, planned)
        assert TrainConfig.from_dict(planned.to_dict()) == planned  # an old config.json's concrete values load


def _expected_tier(cfg: TrainConfig, n: float) -> tuple[ClassifierTier | None, float | None]:
    """The rule, restated: the first tier (table order) whose own plan's σ_c/B_c is within its limit."""
    for tier in CLASSIFIER_TIERS:
        knobs = {k: v for k, v in tier.knobs.items() if getattr(cfg, k) is None}
        if knobs.get("classifier_weight") == 0 and not cfg.classifier_labels:
            continue
        batch = knobs.get("classifier_batch", cfg.with_default_knobs().classifier_batch)
        if batch > AUTO_CLASSIFIER_MAX_SAMPLING_RATE * n:
            continue
        try:
            p = plan_training(dataclasses.replace(cfg, classifier_steps=tier.steps, **knobs), n)
        except (ConfigError, PrivacyConfigError):
            continue
        noise = p.schedule.prefix[0].noise / batch
        if noise <= tier.noise_limit:
            return tier, noise
    return None, None


@pytest.mark.parametrize("n,epsilon", [(FASHION, 10), (FASHION, 1), (FASHION, 0.5), (FASHION, 0.2), (FASHION, 0.1),
                                       (9000, 10), (9000, 1), (3600, 10)])
def test_the_tier_table_decides_and_each_limit_is_honoured(n, epsilon):
    cfg = TrainConfig(dataset="fashion-mnist", epsilon=epsilon, delta=DELTA)
    planned = plan_training(cfg, n)
    tier, noise = _expected_tier(cfg, n)
    if tier is None:
        assert planned.config.classifier_steps == 0 and not planned.schedule.prefix
        return
    c = planned.config
    assert c.classifier_steps == tier.steps
    assert planned.schedule.prefix[0].noise / c.classifier_batch == pytest.approx(noise)
    assert noise <= tier.noise_limit  # chosen only within its tier's limit
    for k in PLANNED_KNOBS:
        assert getattr(c, k) == tier.knobs.get(k, PLANNED_KNOBS[k]), k


def test_the_table_is_what_decides(monkeypatch):
    """Another table, another phase: nothing outside CLASSIFIER_TIERS picks the steps or the knobs."""
    cfg = TrainConfig(dataset="fashion-mnist", epsilon=10, delta=DELTA)
    monkeypatch.setattr(plan_module, "CLASSIFIER_TIERS",
                        (ClassifierTier(500, 1.0, {"uncertain_fraction": 0.25}, "a test tier"),))
    wide = plan_training(cfg, FASHION)
    assert (wide.config.classifier_steps, wide.config.uncertain_fraction) == (500, 0.25)
    assert wide.config.between_class_fraction == PLANNED_KNOBS["between_class_fraction"]
    monkeypatch.setattr(plan_module, "CLASSIFIER_TIERS", (ClassifierTier(500, 1e-6, {}, "a test tier"),))
    narrow = plan_training(cfg, FASHION)
    assert narrow.config.classifier_steps == 0 and "past 1e-06" in narrow.how


def test_every_tier_says_what_was_measured():
    assert [t.steps for t in CLASSIFIER_TIERS] == [1000, 300, 300, 75, 300]
    for tier in CLASSIFIER_TIERS:
        assert tier.measured and "\n" not in tier.measured
        assert 0 < tier.noise_limit < 0.01 and set(tier.knobs) <= set(PLANNED_KNOBS)


@pytest.mark.parametrize("knob,bad,flag", [
    ("classifier_batch", 0, "--classifier-batch"), ("classifier_noise", 0.0, "--classifier-noise"),
    ("classifier_noise", math.nan, "--classifier-noise"), ("classifier_weight", -0.1, "--classifier-weight"),
    ("between_class_fraction", 1.5, "--between-class-fraction"), ("uncertain_fraction", -0.1, "--uncertain-fraction")])
def test_a_bad_explicit_knob_is_refused_and_unset_is_valid(knob, bad, flag):
    with pytest.raises(ConfigError, match=flag):
        TrainConfig(**{knob: bad}).validate()
    TrainConfig().validate()  # None: the plan decides
    with pytest.raises(ConfigError, match="--classifier-batch"):  # an unset B_c is 1024 with an explicit phase
        TrainConfig(classifier_steps=10).validate(500)
