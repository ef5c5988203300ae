"""The search's plan, apart from its running: K, the reference, each trial's plan under it, the search's
ledger and privacy reports, and the pre-flight fit checks (docs/design.md §6). The trials (`trial`) and the
search (`tuner`) both plan through it, so it imports neither."""
from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
from typing import Any

from ..config import ConfigError, TrainConfig
from ..privacy.ledger import PrivacyConfigError, PrivacyLedger
from ..privacy.report import data_assumptions, privacy_report
from ..privacy.subsample import SUBSAMPLED_ACCOUNTING, composed_privacy
from ..privacy.tuning import (
    Reference,
    calibrate_reference,
    distribution_shape,
    fit_trial,
    sample_num_trials,
    search_entries,
)
from .search_space import SearchSpace


def trial_knobs(ss: SearchSpace, sampled: dict[str, Any] | None = None) -> dict[str, Any]:
    """The fixed knobs with `sampled` on top. Whatever the space leaves open keeps `train`'s default, so
    the planner resolves it (the DP label-classifier phase included) as it would for a single run."""
    return {**ss.fixed, **(sampled or {})}


def validation_fraction(ss: SearchSpace) -> float:
    """The trials' held-out share f (public)."""
    return float(ss.fixed.get("validation_fraction", TrainConfig.validation_fraction))


# --- the search plan (kept in the trusted run directory) -------------------------------------
def reference_batch_size(ss: SearchSpace) -> int:
    """The planned trial's B: reference.batch_size, else the largest batch the space can draw.

    A trial with a larger q than the reference's has an RDP curve that rises faster with the
    order and fits under it only with much slack (a trial at 2× the reference's batch keeps about
    70 % of its ε); trials at smaller q with the same number of epochs keep 90–100 %."""
    if ss.reference_batch_size is not None:
        return ss.reference_batch_size
    sizes = [int(v) for p in ss.params if p.name == "batch_size" for v in p.extremes()]
    return max(sizes) if sizes else int(ss.fixed.get("batch_size", TrainConfig.batch_size))


def reference_classifier_steps(ss: SearchSpace) -> int | None:
    """The planned trial's classifier phase: reference.classifier_steps, else the longest the space
    can draw, so that a trial drawn with the phase fits under the reference without extra noise
    (one drawn without it fits with slack); None where the space does not search it (the fixed value,
    or the planner's default tiers, as for a single run)."""
    if ss.reference_classifier_steps is not None:
        return ss.reference_classifier_steps
    steps = [int(v) for p in ss.params if p.name == "classifier_steps" for v in p.extremes()]
    return max(steps) if steps else None


def epoch_matched_iterations(iterations: int, reference_batch: int, batch_size: int) -> int:
    """T of a trial at batch B that sees as many epochs as `iterations` at the reference batch: the one
    rule the trials, the pre-flight check and the fit table share (a trial at a larger batch runs fewer
    iterations, and its privacy curve is fitted for that T)."""
    return max(1, round(iterations * reference_batch / batch_size))


def trial_config(ss: SearchSpace, sampled: dict[str, Any] | None, epsilon: float, delta: float,
                 seed: int | None = None, iterations: int | None = None) -> TrainConfig:
    """A trial's run as `python -m dpaf_ray train` would take it: the fixed and sampled knobs at the trial's
    budget, with the search's compute as train's flags (trial.iterations as --iterations, at the reference
    batch and as many epochs at another; trial.time_budget_minutes as --time-budget-minutes); a space that
    sets neither gets train's default T and default classifier phase."""
    knobs = trial_knobs(ss, sampled)
    batch = int(knobs.get("batch_size") or TrainConfig.batch_size)
    if iterations is None and ss.trial_iterations is not None:
        iterations = epoch_matched_iterations(ss.trial_iterations, reference_batch_size(ss), batch)
    cfg = TrainConfig.from_dict({**knobs, "dataset": ss.dataset, "data_root": ss.data_root,
                                 "num_classes": ss.num_classes, "epsilon": epsilon, "delta": delta, "seed": seed,
                                 "iterations": iterations, "time_budget_minutes": ss.time_budget_minutes})
    return dataclasses.replace(cfg, group_size=min(cfg.group_size, cfg.batch_size))  # as clamp_group


def reference_config(ss: SearchSpace) -> TrainConfig:
    """The planned trial's run configuration before the planner: the fixed knobs at the reference batch size
    and classifier phase, at the search's budget."""
    sampled: dict[str, Any] = {"batch_size": reference_batch_size(ss)}
    steps = reference_classifier_steps(ss)
    if steps is not None:
        sampled["classifier_steps"] = steps
    return trial_config(ss, sampled, *ss.search_target())


def plan_trial(ss: SearchSpace, sampled: dict[str, Any] | None, epsilon_trial: float, delta: float, n_train: float,
               image_size: int, seconds_per_iteration: float | None = None, seed: int | None = None,
               iterations: int | None = None) -> Any:
    """A trial's training, planned by `train`'s planner (`training.plan.plan_training`: its T rules, phase
    tiers and release knobs) at the trial's budget ε_trial and the public N: one planner for both paths."""
    return plan_run(trial_config(ss, sampled, epsilon_trial, delta, seed, iterations), n_train, image_size,
                    seconds_per_iteration)


def plan_run(cfg: TrainConfig, n_train: float, image_size: int, seconds_per_iteration: float | None = None) -> Any:
    """`plan_training`, except for a drawn σ with a given T: `train` would refuse it past the budget; in a
    search it is a point of the noise split, scaled with the other σ to lie under the reference
    (`under_reference`), as it always was."""
    from ..training.plan import TrainingPlan, plan_training, schedule_for

    if cfg.explicit_noise and cfg.iterations is not None:
        sigma_agg, sigma_sgd = cfg.base_sigmas()
        cfg = dataclasses.replace(cfg.with_default_knobs(), sigma_agg=sigma_agg if cfg.model == "dpaf" else cfg.sigma_agg,
                                  sigma_sgd=sigma_sgd, classifier_steps=cfg.classifier_steps or 0)
        return TrainingPlan(cfg, schedule_for(cfg, n_train), cfg.prefix_iterations + cfg.iterations, float("nan"),
                            1.0, "--iterations; noise as drawn", seconds_per_iteration)
    return plan_training(cfg, n_train, image_size, seconds_per_iteration)


def under_reference(plan: Any, score_noise: float | None, reference: Reference, n_train: float) -> Any:
    """The plan with its noise multipliers scaled together to the least with which its iterations and its
    noisy score lie under the reference at every order (fit_trial). A trial shaped like the reference keeps
    its planned noise up to the calibration's tolerance (≈ 0.1 %); another shape gets what fits."""
    from ..training.plan import TrainingPlan, schedule_for

    factor = fit_trial(plan.schedule, plan.iterations, score_noise, reference).noise_factor
    cfg = plan.config
    cfg = dataclasses.replace(cfg, sigma_agg=cfg.sigma_agg * factor if cfg.model == "dpaf" else cfg.sigma_agg,
                              sigma_sgd=cfg.sigma_sgd * factor)
    return TrainingPlan(cfg, schedule_for(cfg, n_train), plan.iterations, float("nan"), plan.noise_factor * factor,
                        f"{plan.how}; noise ×{factor:.4g} to lie under the reference", plan.seconds_per_iteration)


def training_epsilon(reference: Reference, delta: float) -> float:
    """ε_trial: what the reference's training alone spends, on the planner's orders. A single run planned at
    ε_trial in the reference's shape is the reference's training, and with its noisy score the reference."""
    return PrivacyLedger(list(reference.schedule.entries(reference.iterations))).epsilon(delta)


def _plan_shape(plan: Any) -> str:
    """Everything of a plan but its noise level: what the reference is shaped from."""
    cfg = dataclasses.replace(plan.config, sigma_agg=None, sigma_sgd=None, epsilon=1.0, seed=None)
    return json.dumps([cfg.to_dict(), plan.iterations], sort_keys=True, default=str)


def search_records(ss: SearchSpace, n_records: float) -> float:
    """The public N the trials plan with: N, or on a subsample its expected size γ·N (an assumption
    stated in the report: the realised subsample size is never used)."""
    return n_records if ss.subsample_fraction is None else ss.subsample_fraction * n_records


def search_train_records(ss: SearchSpace, n_records: float) -> float:
    """The public expected training records a trial plans with: (1 − f)·N, or (1 − f)·γ·N on a subsample."""
    return (1 - validation_fraction(ss)) * search_records(ss, n_records)


def plan_reference(ss: SearchSpace, n_train: float, image_size: int, seconds_per_iteration: float | None = None,
                   rounds: int = 8) -> tuple[Any, Reference, float]:
    """The planned trial, its reference and ε_trial, as a fixed point: the reference is shaped like `train`'s
    plan of the reference knobs at ε_trial, and ε_trial is what that reference's training spends. The plan's
    shape (T, classifier tier) depends on ε only through public rules, so a few rounds settle it; where the
    tiers would alternate, the last reference stands (every trial is fitted under it, so the bound holds)."""
    target_eps, target_delta = ss.search_target()
    score_noise = None if ss.public_validation else ss.score_noise
    shape_k = distribution_shape(ss.trials_distribution, ss.tnb_shape)
    cfg = reference_config(ss)
    eps_trial, seen, ref_plan, reference = target_eps, None, None, None
    for _ in range(rounds):
        try:
            plan = plan_run(dataclasses.replace(cfg, epsilon=eps_trial), n_train, image_size, seconds_per_iteration)
        except ConfigError as err:
            raise PrivacyConfigError(
                f"the budget ε={target_eps:g} is too small for a search with {ss.expected_trials:g} expected trials: "
                f"a trial at ε_trial={eps_trial:.3g} cannot be planned ({err}); raise --epsilon, lower "
                "--expected-trials, or plan shorter trials (trial.iterations)") from err
        if _plan_shape(plan) == seen:
            break
        reference = calibrate_reference(target_eps, target_delta, plan.schedule, plan.iterations, score_noise,
                                        ss.search, ss.expected_trials, shape_k)
        eps_trial, seen, ref_plan = training_epsilon(reference, target_delta), _plan_shape(plan), plan
    return ref_plan, reference, eps_trial


def plan_search(ss: SearchSpace, n_records: int, shape: tuple[int, int, int], num_classes: int) -> dict[str, Any]:
    """K, the reference and the sampler's seed; data-independent given the public N, shape and K classes."""
    from .resources import trial_seconds_per_iteration

    shape_k = distribution_shape(ss.trials_distribution, ss.tnb_shape)
    cfg = reference_config(ss)
    n_train = search_train_records(ss, n_records)
    cfg.validate(n_train)
    speed = None
    if cfg.iterations is None and cfg.time_budget_minutes is not None:  # generated data: no privacy cost
        speed = trial_seconds_per_iteration(ss, cfg, shape, num_classes, n_train, in_trial=False)
    ref_plan, reference, eps_trial = plan_reference(ss, n_train, shape[1], speed)
    if ss.search == "random":
        k = sample_num_trials(ss.expected_trials, shape_k)  # cryptographic; never re-drawn
    else:
        k = int(ss.expected_trials)
    return {"num_trials": k, "shape": shape_k, "reference": reference.to_json(), "reference_iterations_from": ref_plan.how,
            "epsilon_trial": eps_trial, "reference_plan": {k2: v for k2, v in ref_plan.config.to_dict().items()
                                                           if k2 not in ("seed", "data_root", "extra_fixed_releases")},
            "sampler_seed": secrets.randbits(31), "created": time.time(), "search_space": ss.to_dict(),
            "n_records": n_records, "image_shape": list(shape), "num_classes": num_classes}


def reference_from(state: dict[str, Any]) -> Reference:
    return Reference.from_json(state["reference"])


def reference_warnings(ss: SearchSpace, state: dict[str, Any]) -> list[str]:
    """A reference so noisy that its trials cannot rank anything: DPAGG's noise on one group mean
    past the level where a single run stops learning (plan.NOISY_GROUP_MEAN). Every trial would score
    near chance and the choice would be a draw from the prior. A warning: the budget is still met."""
    from ..training.plan import noisy_group_mean, schedule_for

    cfg = reference_config(ss)
    if cfg.model != "dpaf":
        return []
    reference = reference_from(state)
    n_train = search_train_records(ss, state["n_records"])
    factor = reference.schedule.cycle[0] / schedule_for(cfg, n_train).cycle[0]
    fix = ("raise subsample.epsilon_share (--subsample-epsilon-share) or subsample.fraction; "
           "`python bench/tuning_gain.py --search-space FILE` prints the trade for each share"
           if ss.subsample_fraction is not None else
           "raise --epsilon, lower expected_trials or plan shorter trials (trial.iterations)")
    warning = noisy_group_mean(cfg.base_sigmas()[0] * factor, cfg.group_size,
                               f"the trials would score near chance and the choice be close to a random draw: {fix}")
    return [f"in the trials, {warning}"] if warning else []


def search_ledger(ss: SearchSpace, state: dict[str, Any]) -> PrivacyLedger:
    """What the whole search is charged: written to OUT/ledger.json before any trial runs."""
    reference = reference_from(state)
    return PrivacyLedger(search_entries(reference, ss.search, ss.expected_trials, state["shape"]), reference.orders)


def search_privacy_report(ss: SearchSpace, state: dict[str, Any], best_knobs: dict[str, Any] | None) -> dict[str, Any]:
    """The release's report: ε of the whole search, from the search ledger."""
    if ss.subsample_fraction is not None:
        raise ValueError("a subsampled search is reported by subsampled_privacy_report")
    fraction = validation_fraction(ss)
    assumptions = data_assumptions(state["n_records"], fraction, state["num_classes"], tuple(state["image_shape"]),
                                   class_names=state.get("class_names"))
    assumptions["search"] = ("every trial's executed RDP curve lies under the reference at every order; the "
                             "number of trials K is drawn with a cryptographic RNG and kept private")
    reference = reference_from(state)
    return privacy_report(
        search_ledger(ss, state), delta=ss.delta, target_epsilon=ss.epsilon, reproducible_noise=False,
        assumptions=assumptions,
        extra={"search": ss.search,
               "trials_distribution": {"kind": ss.trials_distribution,
                                       "mean": ss.expected_trials,
                                       "shape": "inf" if math.isinf(state["shape"]) else state["shape"]},
               "reference": {**reference.to_json(), "epsilon_alone": reference.epsilon(ss.delta)},
               "knobs": best_knobs})



def check_space_fits(ss: SearchSpace, state: dict[str, Any]) -> None:
    """Before Ray starts and before any trial: each extreme value of each searched knob (with
    the fixed ones) gives q ≤ 1 and fits under the reference within the noise limit, and on a
    subsample its final run on all records can be planned at ε_f; the error names the YAML key."""
    from ..config import ConfigError
    from ..privacy.ledger import PrivacyConfigError
    from ..training.plan import MAX_NOISE_MULTIPLIER, plan_training
    from .search_space_error import SearchSpaceError

    reference = reference_from(state)
    budget = ss.subsample_budget()
    final_eps = budget.final_epsilon(search_ledger(ss, state)) if budget is not None else None
    n_train = search_train_records(ss, state["n_records"])
    score_noise = None if ss.public_validation else ss.score_noise
    schedule_knobs = {"batch_size", "sgd_every", "noise_split", "sigma_agg", "sigma_sgd", "model",
                      "classifier_steps", "classifier_batch", "classifier_noise"}
    cases = [("fixed", {})] + [(f"params.{p.name}", {p.name: v}) for p in ss.params for v in p.extremes()]
    _, target_delta = ss.search_target()
    epsilon_trial = float(state.get("epsilon_trial") or training_epsilon(reference, target_delta))
    for key, knobs in cases:
        cfg = trial_config(ss, knobs, epsilon_trial, target_delta)
        if cfg.batch_size > n_train:
            raise SearchSpaceError(f"{ss.path}: `{key}`: batch size {cfg.batch_size} exceeds the {n_train:g} expected "
                                   f"training records (q = B/N > 1); lower it")
        if key != "fixed" and not set(knobs) & schedule_knobs:
            continue
        if cfg.iterations is None and cfg.time_budget_minutes is not None:  # no speed probe before Ray starts:
            cfg = dataclasses.replace(cfg, iterations=epoch_matched_iterations(  # the reference's epochs
                reference.gan_iterations, reference_batch_size(ss), cfg.batch_size))
        try:
            plan = under_reference(plan_trial(ss, knobs, epsilon_trial, target_delta, n_train,
                                              state["image_shape"][1], iterations=cfg.iterations),
                                   score_noise, reference, n_train)
        except (ConfigError, PrivacyConfigError) as err:
            raise SearchSpaceError(f"{ss.path}: `{key}`: {knobs or 'the fixed knobs'} cannot run under the "
                                   f"reference ({err})") from err
        sigma = plan.schedule.cycle[0]
        if sigma > MAX_NOISE_MULTIPLIER:
            raise SearchSpaceError(f"{ss.path}: `{key}`: {knobs} needs σ_eff={sigma:.3g} to fit under the reference, "
                                   f"beyond the limit {MAX_NOISE_MULTIPLIER:g}; narrow the range, raise the budget or "
                                   "lower the expected number of trials")
        if final_eps is not None:  # the final run these knobs would get must be plannable: checked before any spend
            final = final_config(ss, {**plan.config.to_dict(), "time_budget_minutes": None},  # no probe here
                                 final_eps, budget.final_delta)
            try:
                plan_training(final, state["n_records"], state["image_shape"][1])
            except (ConfigError, PrivacyConfigError) as err:
                raise SearchSpaceError(f"{ss.path}: `{key}`: {knobs or 'the fixed knobs'}: the final run on all records "
                                       f"cannot be planned at ε_f={final_eps:.3g} ({err}); lower "
                                       "subsample.epsilon_share or narrow the range") from err



def final_config(ss: SearchSpace, knobs: dict[str, Any], epsilon: float, delta: float) -> TrainConfig:
    """The final run: the best trial's released knobs, on all training records (no validation split:
    the final run is not scored), budget first at (ε_f, δ_f): its T is subsample.final_iterations,
    else what a single `dpaf_ray train` run of these knobs would plan (trials are often cut short to
    fit a search's time; the final run is the one released), and its noise multipliers are scaled
    together by the planner in the trial's σ_agg/σ_sgd ratio."""
    knobs = {k: v for k, v in knobs.items() if k not in ("seed", "data_root", "extra_fixed_releases", "iterations")}
    if ss.subsample_final_iterations is not None:
        knobs["iterations"] = ss.subsample_final_iterations
    cfg = TrainConfig.from_dict({**knobs, "data_root": ss.data_root, "epsilon": epsilon, "delta": delta,
                                 "validation_fraction": 0.0, "sigma_agg": None, "sigma_sgd": None})
    if cfg.model == "dpaf" and knobs.get("sigma_agg") and knobs.get("sigma_sgd"):
        cfg = dataclasses.replace(cfg, noise_split=float(knobs["sigma_agg"]) / float(knobs["sigma_sgd"]))
    return cfg


def subsampled_privacy_report(ss: SearchSpace, state: dict[str, Any], best_knobs: dict[str, Any] | None,
                              final: Any | None) -> dict[str, Any]:
    """The release's report of a subsampled search: each part, its ledger and their composition,
    with the total from `privacy.subsample.composed_privacy` (the two ledgers only)."""
    budget = ss.subsample_budget()
    fraction = validation_fraction(ss)
    n = state["n_records"]
    assumptions = data_assumptions(n, fraction, state["num_classes"], tuple(state["image_shape"]),
                                   class_names=state.get("class_names"))
    assumptions["validation_split"] = (f"inside the subsample, each record is held out for the trials' scores with "
                                       f"probability {fraction:g} by a keyed hash of its own pixels and label under "
                                       "the search secret; the final run holds nothing out (it is not scored)")
    assumptions["subsample"] = (f"each training record joins the tuning subsample independently with probability "
                                f"γ = {budget.fraction:g} (a keyed hash of the record and its occurrence number under "
                                "the search secret); membership is never written outside the private checkpoints. "
                                f"The trials plan with the public expected subsample size γ·N = "
                                f"{search_records(ss, n):g} (their q = B / ((1 − f)·γ·N)), never the realised size")
    assumptions["search"] = ("every trial's executed RDP curve lies under the reference at every order; the "
                             "number of trials K is drawn with a cryptographic RNG and kept private")
    assumptions["final_run"] = ("the best trial's knobs, as released by the search, trained once on all N records "
                                "with a fresh secret; its budget ε_f = ε − amplified ε_s is computed from the search's "
                                "ledger, which is fixed before any trial runs")
    s_ledger = search_ledger(ss, state)
    f_ledger = final.ledger if final is not None else None
    composed = composed_privacy(s_ledger, f_ledger, budget)
    reference = reference_from(state)
    search_part = {**s_ledger.to_json(), **composed["search"], "target_epsilon": budget.search_epsilon,
                   "search": ss.search,
                   "trials_distribution": {"kind": ss.trials_distribution, "mean": ss.expected_trials,
                                           "shape": "inf" if math.isinf(state["shape"]) else state["shape"]},
                   "reference": {**reference.to_json(), "epsilon_alone": reference.epsilon(budget.search_delta)},
                   "knobs": best_knobs}
    final_part: dict[str, Any] = {**(f_ledger.to_json() if f_ledger is not None else
                                     PrivacyLedger(orders=s_ledger.orders).to_json()), **composed["final"]}
    if final is not None:
        final_part.update({"target_epsilon": final.plan.config.epsilon, "iterations_executed": final.iterations_done,
                           "sampling_rate": final.plan.schedule.sampling_rate,
                           "knobs": {k: v for k, v in final.plan.config.to_dict().items()
                                     if k not in ("seed", "data_root", "extra_fixed_releases")}})
    else:
        final_part["note"] = "no final run: no trial finished (or K = 0), so no knobs were released to train"
    return {"epsilon": composed["epsilon"], "target_epsilon": ss.epsilon, "delta": ss.delta,
            "delta_composed": composed["delta"], "private": True, "reproducible_noise": False,
            "accounting": SUBSAMPLED_ACCOUNTING, "composition": composed["composition"],
            "amplification": composed["amplification"], "subsample": budget.to_json(),
            "search": search_part, "final": final_part, "assumptions": assumptions}
