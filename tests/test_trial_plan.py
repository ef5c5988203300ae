"""One planner for trials and single runs (docs/design.md §6, issue #35): a trial is `train`'s plan at the trial's
budget ε_trial and the public N, and the search's reference is shaped from that plan."""
from __future__ import annotations

import pytest

from dpaf_ray.config import TrainConfig
from dpaf_ray.privacy.ledger import Gaussian, PrivacyLedger
from dpaf_ray.privacy.report import data_assumptions
from dpaf_ray.training.plan import plan_training
from dpaf_ray.tuning.search_space import SearchSpace
from dpaf_ray.tuning.reference import (
    plan_search,
    plan_trial,
    reference_from,
    search_privacy_report,
    search_train_records,
    under_reference,
)

N, DELTA, SCORE = 60_000, 1e-5, 20.0


@pytest.fixture(scope="module")
def default_search():
    """A one-point space holding the defaults (no knob fixed or searched, train's default T) on Fashion-MNIST's
    public N at ε = 10: at its ε_trial train's planner picks a DP label-classifier phase."""
    ss = SearchSpace(path="<defaults>", dataset="fashion-mnist", epsilon=10.0, delta=DELTA, expected_trials=2.0,
                     score_noise=SCORE)
    return ss, plan_search(ss, N, (1, 28, 28), 10)


def test_a_trial_of_the_defaults_trains_exactly_what_train_plans_at_its_budget(default_search):
    ss, state = default_search
    eps_trial, n_train = state["epsilon_trial"], search_train_records(ss, N)
    assert 0 < eps_trial < ss.epsilon
    reference = reference_from(state)
    trial = under_reference(plan_trial(ss, {}, eps_trial, DELTA, n_train, 28, seed=3), SCORE, reference, n_train)
    single = plan_training(TrainConfig(dataset="fashion-mnist", epsilon=eps_trial, delta=DELTA, seed=3), n_train, 28)
    assert single.schedule.prefix, "the default plan at this ε_trial has a classifier phase: the test needs one"
    assert trial.config.to_dict() == single.config.to_dict()  # every field: knobs, T, phase, release knobs, σ
    assert trial.iterations == single.iterations and trial.schedule == single.schedule
    # the reference is shaped from that plan: same T, q, classifier phase and noise ratios
    assert reference.iterations == single.iterations
    assert reference.schedule.sampling_rate == single.schedule.sampling_rate
    assert [(p.sampling_rate, p.iterations) for p in reference.schedule.prefix] == \
        [(p.sampling_rate, p.iterations) for p in single.schedule.prefix]
    assert reference.schedule.cycle[1] / reference.schedule.cycle[0] == \
        pytest.approx(single.schedule.cycle[1] / single.schedule.cycle[0], rel=1e-12)
    # and the trial, with its noisy score, spends (all of) the reference's standalone ε, never more
    spent = PrivacyLedger(trial.schedule.entries(trial.iterations) + [Gaussian(SCORE)], reference.orders)
    assert 0.99 * reference.epsilon(DELTA) <= spent.epsilon(DELTA) <= reference.epsilon(DELTA) * (1 + 1e-9)


def test_trials_of_other_knobs_keep_at_least_90_percent_of_the_reference(default_search):
    ss, state = default_search
    reference, n_train = reference_from(state), search_train_records(ss, N)
    for knobs in ({"batch_size": 128}, {"sgd_every": 1}, {"noise_split": 2.0}, {"classifier_steps": 0}):
        trial = under_reference(plan_trial(ss, knobs, state["epsilon_trial"], DELTA, n_train, 28), SCORE, reference,
                                n_train)
        spent = PrivacyLedger(trial.schedule.entries(trial.iterations) + [Gaussian(SCORE)], reference.orders)
        assert 0.9 * reference.epsilon(DELTA) <= spent.epsilon(DELTA) <= reference.epsilon(DELTA) * (1 + 1e-9), knobs


def test_reports_say_the_defaults_were_chosen_on_public_fashion_mnist_and_mnist(default_search):
    ss, state = default_search
    for assumptions in (data_assumptions(N, 0.1, 10, (1, 28, 28), 256),
                        search_privacy_report(ss, state, None)["assumptions"]):
        text = assumptions["defaults"]
        assert "Fashion-MNIST" in text and "MNIST" in text and "without privacy" in text
        assert "does not cover" in text


def test_every_trial_is_scored_with_common_random_numbers():
    """Two trials' generators differ; their scoring classifiers start from the same initialisation, read the
    synthetic sets in the same order and the sets carry the same drawn classes, so the scores differ by the
    generators alone (the global RNG state does not enter)."""
    import torch

    from dpaf_ray.models.architecture import architecture_for
    from dpaf_ray.models.generator import ConditionalGenerator
    from dpaf_ray.tuning.resources import _synthesise_and_fit
    from dpaf_ray.tuning.scoring import SCORE_CLASSIFIER_SEED

    torch.set_num_threads(1)
    arch = architecture_for((1, 28, 28))
    fits = []
    for seed in (1, 2):
        torch.manual_seed(seed)  # two trials: other generators, another global RNG state
        g = ConditionalGenerator(arch, 10, 16)
        fits.append(_synthesise_and_fit(g, 200, 0, 0, SCORE_CLASSIFIER_SEED, "cpu"))  # 0 steps: the initial model
    (s1, m1), (s2, m2) = fits
    assert not torch.equal(s1.images, s2.images)
    assert torch.equal(s1.labels, s2.labels)
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))
