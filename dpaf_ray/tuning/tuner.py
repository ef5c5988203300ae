"""Private hyperparameter search with Ray Tune + Optuna (docs/design.md §6).

    K ← TNB/logarithmic/Poisson(mean) from a cryptographic RNG      (random search; TPE: fixed K)
    reference ← largest curve whose repeat-and-select (or K-fold composition) meets (ε, δ)
    each trial: config ~ Optuna (RandomSampler or TPE), T and σ fitted under the reference,
                train (Ray Train, W workers), noisy validation score, ledger checked ≤ reference
    release: the best trial by noisy score + the search's privacy report

With a `subsample` section (issue #14, `privacy.subsample`) the trials see only a Poisson
subsample of the training records (rate γ, from the search secret), the search is calibrated to
its own (ε_s, δ_s), and the best trial's released knobs are then trained once on all records at the
budget the amplified search leaves; that final run's generator is what is released.

Trials run FIFO, never stopped early from other trials' results. Tune and the dashboard see
only DP values: noisy scores, ε, losses computed from released aggregates.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError, TrainConfig
from ..privacy.ledger import Gaussian, PrivacyConfigError, PrivacyLedger
from ..privacy.randomness import RunSecret
from ..privacy.report import data_assumptions, privacy_report
from ..privacy.subsample import SUBSAMPLED_ACCOUNTING, composed_privacy
from ..privacy.tuning import (
    Reference,
    TrialFit,
    calibrate_reference,
    check_trial_under_reference,
    distribution_shape,
    fit_trial,
    sample_num_trials,
    search_entries,
)
from .search_space import SearchSpace

STATE_FILE = "search_state.json"


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
        cfg = dataclasses.replace(cfg, sigma_agg=sigma_agg if cfg.model == "dpaf" else cfg.sigma_agg,
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


# --- one trial ---------------------------------------------------------------------------------
TRIAL_PLAN_FILE = "plan.json"  # TRIAL/plan.json: the first attempt's plan, which a restart replays


def write_trial_plan(trial_dir: Path, plan: Any) -> None:
    """Every public input of the trial's training (configuration with the public seed, T, noise), on disk
    before its first charge."""
    _atomic_json(trial_dir / TRIAL_PLAN_FILE, {"config": plan.config.to_dict(), "iterations": plan.iterations,
                                               "noise_factor": plan.noise_factor, "how": plan.how})


def read_trial_plan(trial_dir: Path) -> dict[str, Any] | None:
    path = trial_dir / TRIAL_PLAN_FILE
    return json.loads(path.read_text()) if path.exists() else None


# Fault tests only: "PHASE[,PHASE…]:MARKER_DIR" SIGKILLs the driver once at each phase (before_trials,
# mid_trial, between_trials, finish_search, writing_release); MARKER_DIR/PHASE records that it fired.
KILL_DRIVER_ENV = "DPAF_TEST_KILL_DRIVER_AT"
DRIVER_PID_ENV = "DPAF_TEST_DRIVER_PID"  # set by the driver, inherited by the Ray processes it starts
FAULT_PHASES = ("before_trials", "mid_trial", "between_trials", "finish_search", "writing_release")


def _kill_driver(phase: str, detail: str = "") -> None:
    spec = os.environ.get(KILL_DRIVER_ENV)
    if not spec:
        return
    phases, marker_dir = spec.rsplit(":", 1)
    marker = Path(marker_dir) / phase
    if phase not in phases.split(",") or marker.exists():
        return
    marker.write_text(detail)
    driver = int(os.environ.get(DRIVER_PID_ENV, os.getpid()))
    os.kill(driver, signal.SIGKILL)
    if driver != os.getpid():  # a trial's process dies with its driver, as on a lost head node
        os.kill(os.getpid(), signal.SIGKILL)


def _driver_kill_hook(phase: str, at: int, label: str) -> Callable[[int], None] | None:
    """A `before_iteration` hook that kills the driver before iteration `at` (fault tests only); the
    marker records `label:at`."""
    if not os.environ.get(KILL_DRIVER_ENV):
        return None
    return lambda t: _kill_driver(phase, f"{label}:{t}") if t == at else None


def _wait_until_tune_records(trial_id: str, experiment: str | None, timeout: float = 60.0) -> None:
    """Before a trial touches data, wait (a while) until Tune's experiment state on disk lists it: a trial
    that a dead driver had started but Tune never recorded would be replaced by a new one on resume, and
    its folder would then count as a run beyond K (finish_search refuses that; this makes it rare).
    Local storage only; elsewhere the refusal alone holds."""
    if not experiment or not Path(experiment).is_dir():
        return
    deadline = time.time() + timeout
    while time.time() < deadline:
        for state in Path(experiment).glob("experiment_state*.json"):
            try:
                if trial_id in state.read_text():
                    return
            except OSError:
                pass
        time.sleep(0.5)


def run_trial(config: dict[str, Any], search_secret: RunSecret | None = None) -> None:
    """A Tune function trainable: fit T under the reference, train, score, report.

    Its private randomness comes from the search secret: the split (one for all trials) and
    the trial's own secret, a child keyed by the trial id.

    A trial that Tune restarts (a resumed search continues the trials a dead driver left running)
    keeps every public input of its first attempt: the plan (public seed, T, noise) is written to
    TRIAL/plan.json before anything is charged and read back on restart, and training continues from
    the trial's last checkpoint. Every draw of iteration t is keyed by (trial secret, t) or (seed, t),
    so an iteration the write-ahead journal already charged is replayed with the same noise on the
    same sums: it releases nothing new and is not charged again (`train_loop(replay_charged=True)`),
    and the trial's ledger stays the one mechanism fitted under the reference (docs/design.md rule 17). A
    fresh secret per attempt would instead need every attempt's charge under the one reference,
    leaving a restarted trial only what its first attempt had not spent."""
    import ray.tune
    from ray.tune import Checkpoint

    from ..data import load_dataset, load_training_data, write_parquet
    from ..data.splits import SPLIT_LABEL
    from ..training.loop import WriteAheadLedger, time_cap_note, train_loop
    from ..release import label_balance_warning, write_artefacts
    from ..training.plan import TrainingPlan, schedule_for
    from .resources import synthesise_and_fit, trial_device, trial_seconds_per_iteration, trial_worker_share
    from .scoring import SCORE_CLASSIFIER_SEED, score_trial

    if search_secret is None:
        raise RuntimeError("a trial needs the search secret (pass it with tune.with_parameters)")
    trial_started = time.time()
    static = config["_static"]
    ss = SearchSpace(**{**static["search_space"], "params": []})
    reference = reference_from(static)
    sampled = {k: v for k, v in config.items() if k != "_static"}
    context = ray.tune.get_context()
    trial_name, trial_id = context.get_trial_name(), context.get_trial_id()
    trial_dir = Path(static["trials_dir"]) / trial_name
    if not trial_dir.exists() and list(Path(static["trials_dir"]).glob("*/trial.json")):
        _kill_driver("between_trials")  # fault tests: after one trial finished, before this one starts
    _wait_until_tune_records(trial_id, static.get("tune_experiment"))
    trial_dir.mkdir(parents=True, exist_ok=True)  # first: every trial that started has a folder (a run)
    if (trial_dir / "trial.json").exists():  # finished before the driver died: nothing to redo
        done = json.loads((trial_dir / "trial.json").read_text())
        ray.tune.report({"score": done["score"], "epsilon_trial": done["epsilon_trial"],
                         "iterations": done["iterations"], "noise_factor": done["noise_factor"]},
                        checkpoint=Checkpoint.from_directory(str(trial_dir)))
        return
    trial_secret = search_secret.child(f"trial/{trial_id}")
    split_key = search_secret.child(SPLIT_LABEL)
    target_eps, target_delta = ss.search_target()  # (ε, δ), or (ε_s, δ_s) on a subsample
    journal = WriteAheadLedger(trial_dir / "ledger.json")
    saved = read_trial_plan(trial_dir)
    if saved is None and journal.load() is not None:
        raise RuntimeError(f"{trial_dir} holds charges but no {TRIAL_PLAN_FILE}: an attempt that cannot be replayed "
                           "identically; the trial counts as a run that failed")
    epsilon_trial = float(static.get("epsilon_trial") or training_epsilon(reference, target_delta))
    cfg = (TrainConfig.from_dict(saved["config"]) if saved is not None else
           trial_config(ss, sampled, epsilon_trial, target_delta, seed=secrets.randbits(31)))
    subsample = None
    if ss.subsample_fraction is not None:  # only the subsample (validation side included), from the search secret
        from ..data.splits import SUBSAMPLE_LABEL, Subsample

        subsample = Subsample(ss.subsample_fraction, search_secret.child(SUBSAMPLE_LABEL))
    data = load_training_data(cfg, split_key, subsample)
    score_noise = None if ss.public_validation else ss.score_noise
    cfg.validate(data.expected_train)
    if saved is None:  # train's planner at ε_trial (one planner), then the least noise under the reference
        speed = None
        if cfg.iterations is None and cfg.time_budget_minutes is not None:
            speed = trial_seconds_per_iteration(ss, cfg, data.shape, data.num_classes, data.expected_train,
                                                in_trial=True)  # on the trial's device
        planned = plan_trial(ss, sampled, epsilon_trial, target_delta, data.expected_train, data.shape[1], speed,
                             cfg.seed)
        plan = under_reference(planned, score_noise, reference, data.expected_train)
        cfg = plan.config
        cfg.validate(data.expected_train)
        write_trial_plan(trial_dir, plan)  # before the first charge: a restart replays exactly this plan
    else:
        plan = TrainingPlan(cfg, schedule_for(cfg, data.expected_train), int(saved["iterations"]), float("nan"),
                            float(saved["noise_factor"]), f"{saved['how']}; restarted with its first attempt's plan")
    P = plan.schedule.prefix_iterations  # T GAN iterations after any classifier phase
    T = plan.iterations - P
    fit = TrialFit(plan.iterations, plan.noise_factor)
    kill_hook = _driver_kill_hook("mid_trial", min(plan.iterations - 1, cfg.checkpoint_every + 1), trial_name)
    if ss.num_workers == 0:
        from ..ray_train import console_line

        result = train_loop(plan, data.train, len(data.train), sink=TrialCheckpointSink(trial_dir),
                            progress=lambda m: console_line(f"{trial_name}: {m}"), secret=trial_secret,
                            journal=journal, device=trial_device(ss),  # the GPU share the trial holds, when use_gpu
                            before_iteration=kill_hook, replay_charged=True)
    else:
        from ..ray_train import fit_with_ray_train

        result = fit_with_ray_train(plan, data, ss.num_workers, ss.use_gpu, None, None, None,
                                    secret=trial_secret, split_key=split_key, ledger_path=trial_dir / "ledger.json",
                                    name=f"{trial_name}-train", max_failures=0,
                                    **trial_worker_share(ss), storage_path=static["train_storage"],
                                    report_defaults={"score": float("nan")}, subsample=subsample,
                                    replay_charged=True)
    if any(isinstance(e, Gaussian) for e in (journal.load() or result.ledger).entries):
        # An earlier attempt charged the score and died before recording it. Its classifier need not be
        # bit-identical to a new one (GPU), so the same score noise on a recount is no replay: fail the trial
        # (a crashed trial counts as a run) rather than release a second noisy count.
        raise RuntimeError(f"{trial_name}: an earlier attempt already charged and computed the noisy score but "
                           "never recorded it; the trial counts as a run that failed")
    ledger = result.ledger
    generator = result.trainer.released_generator().eval()
    # Synthetic set and scoring classifier on the training device (a worker's share, for Ray Train).
    synthetic, classifier = synthesise_and_fit(generator, ss, SCORE_CLASSIFIER_SEED)  # common random numbers
    write_artefacts(trial_dir, generator, ss.num_synthetic, synthetic=synthetic)
    if ss.public_validation:
        validation, expected = load_dataset(ss.public_validation, "test", ss.data_root), None
    else:
        validation, expected = data.validation, data.expected_validation
    score = score_trial(synthetic, validation, ledger, score_noise, ss.classifier_epochs, ss.classifier_max_steps,
                        expected_validation=expected, secret=trial_secret, commit=journal.commit, model=classifier)
    check_trial_under_reference(ledger.entries, reference)

    knobs = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "data_root", "extra_fixed_releases")}
    if result.stopped_early:  # said in the record and on the console: the trial left part of its share unspent
        summary_note = (f"{time_cap_note(result.iterations_done, P + T, cfg.time_budget_minutes)}; the search is "
                        "charged its full share all the same")
        from ..ray_train import console_line

        console_line(f"{trial_name}: STOPPED EARLY: {summary_note}")
    else:
        summary_note = None
    summary = {"trial": trial_name, "note": summary_note, "seconds": time.time() - trial_started,
               "score": score.value, "score_kind": score.kind,
               "score_noise_multiplier": score.noise_multiplier, "expected_validation": score.expected_validation,
               "iterations": result.iterations_done, "iterations_planned": P + T, "noise_factor": fit.noise_factor,
               "stopped_early": result.stopped_early,
               "warning": label_balance_warning(generator, synthetic),
               "epsilon_trial": ledger.epsilon(target_delta), "epsilon_reference": reference.epsilon(target_delta),
               "knobs": knobs, "sampled": sampled,
               "shape": list(data.shape), "num_classes": data.num_classes,
               "ledger": ledger.to_json()}
    (trial_dir / "trial.json").write_text(json.dumps(summary, indent=1))
    ray.tune.report({"score": score.value, "epsilon_trial": summary["epsilon_trial"],
                     "iterations": result.iterations_done, "noise_factor": fit.noise_factor},
                    checkpoint=Checkpoint.from_directory(str(trial_dir)))


# --- the search --------------------------------------------------------------------------------
SECRET_FILE = "search_secret.pt"  # OUT/checkpoint/: private, like every checkpoint


def save_search_secret(out: Path, secret: RunSecret) -> None:
    import torch

    from ..run_dir import private_dir, private_file

    with private_file(private_dir(out / "checkpoint") / SECRET_FILE) as f:
        torch.save(secret.to_checkpoint(), f)


def load_search_secret(out: Path) -> RunSecret:
    import torch

    path = out / "checkpoint" / SECRET_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: the search cannot be resumed without its secret")
    return RunSecret.from_checkpoint(torch.load(path, weights_only=True))


def run_search(ss: SearchSpace, out: Path, resume: bool = False, address: str | None = None,
               storage_path: str | None = None, progress: Callable[[str], None] = print) -> Path:
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch
    import optuna

    from ..data import check_image_shape, load_dataset
    from ..run_dir import own_run_dir, private_dir
    from .resources import check_search_hardware, trial_resources

    out = out.absolute()
    if resume and (out / RELEASE_DIR).exists():  # a release is never rewritten (docs/design.md rule 17)
        progress(released_message(out))
        return out / RELEASE_DIR
    # Before anything is written or charged: the search fits this machine or the cluster
    # (max_concurrent_trials × workers × GPU share), so no trial waits for resources forever.
    check_search_hardware(ss, address)
    if ss.subsample_fraction is not None and ss.use_gpu and ss.num_workers == 0:
        from ..run import resolve_device

        resolve_device(True, 0)  # the final run trains in this process: it needs a GPU here, before anything is charged
    trials_dir = out / "trials"
    state_path = trials_dir / STATE_FILE
    storage = storage_path or str(trials_dir / "ray_tune")
    name = "search"
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume {out}: no {STATE_FILE} there; start a new search with --out")
        state = json.loads(state_path.read_text())
        secret = load_search_secret(out)
        if state["num_trials"] and not (Path(storage) / name).exists():
            check_no_trials_beside_fresh_tuner(out, Path(storage) / name)
        progress(f"resuming the search in {out}")
        private_dir(own_run_dir(out) / "trials")  # a search started before OUT was made private is tightened
    else:
        if state_path.exists():
            raise FileExistsError(f"{out} already holds a search; use --resume {out} or another --out")
        check_no_earlier_search(out)
        ds = load_dataset(ss.dataset, "train", ss.data_root, num_classes=ss.num_classes)
        check_image_shape(ds)
        state = plan_search(ss, len(ds), ds.shape, ds.num_classes)
        state["class_names"] = None if ds.class_names is None else list(ds.class_names)  # public: the report's
        check_space_fits(ss, state)  # every extreme of the space runs under the reference, before Ray starts
        del ds
        secret = RunSecret.fresh()
        private_dir(own_run_dir(out) / "trials")  # 0700 (rule 18): K, every trial's generator and secrets
        save_search_secret(out, secret)
        search_ledger(ss, state).save(out / "ledger.json")  # the whole search's charge, before any trial
        _atomic_json(state_path, state)  # K is fixed before any trial runs
    reference = reference_from(state)
    k = state["num_trials"]
    _, target_delta = ss.search_target()
    cycle = ", ".join(f"{x:.3g}" for x in reference.schedule.cycle)
    budget = ss.subsample_budget()
    if budget is None:
        report_eps = search_ledger(ss, state).epsilon(ss.delta)
        covers = (f"total ε={report_eps:.3f} (target {ss.epsilon:g}, δ={ss.delta:g}) covers training, scoring and "
                  "the search")
    else:
        parts = composed_privacy(search_ledger(ss, state), None, budget)["search"]
        covers = (f"on a Poisson subsample (γ={budget.fraction:g}, expected {search_records(ss, state['n_records']):g} "
                  f"of {state['n_records']} records): the search spends ε_s={parts['epsilon']:.3f} at "
                  f"δ_s={budget.search_delta:g} (target {budget.search_epsilon:.3f}), amplified to "
                  f"{parts['amplified_epsilon']:.3f} of the total ε={ss.epsilon:g}; the final run on all records gets "
                  f"the rest")
    progress(f"private {ss.search} search on {ss.dataset}: {covers}; expected trials {ss.expected_trials:g} "
             f"({ss.trials_distribution}); each trial: T={reference.gan_iterations} ({state['reference_iterations_from']})"
             + (f" after {reference.schedule.prefix_iterations} classifier steps" if reference.schedule.prefix else "")
             + ","
             f" reference q={reference.sampling_rate:.4g}, σ cycle ({cycle}), ε alone "
             f"{reference.epsilon(target_delta):.3f}")

    for w in reference_warnings(ss, state):
        progress(f"plan: WARNING: {w}")

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    # Tune writes its experiment state (which trials exist) at most this often: every step, so that a trial is
    # on disk before it touches data (`_wait_until_tune_records`) and a resume restarts it instead of a new one.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0")
    if os.environ.get(KILL_DRIVER_ENV):  # fault tests: the trials' processes learn whom to kill
        os.environ[DRIVER_PID_ENV] = str(os.getpid())
    from ..ray_train import ensure_ray

    if address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(address)  # the cluster's head must offer the `trial_slot` resource (see clusters/)
    else:
        ensure_ray(None, resources={"trial_slot": ss.max_concurrent_trials}, include_dashboard=True)
    static = {**state, "trials_dir": str(trials_dir), "tune_experiment": str(Path(storage) / name),
              "train_storage": storage_path or str(trials_dir / "ray_train")}
    # The trial itself only waits on its Train workers: it holds a `trial_slot`, not a CPU,
    # so a trial plus its workers never deadlock on a small machine (docs/design.md §9).
    # An in-process trial holds the worker share it trains with, GPU fraction included.
    resources = trial_resources(ss)
    if ss.num_workers > 0 and ray.cluster_resources().get("trial_slot", 0) < 1:
        progress("warning: the cluster offers no `trial_slot` resource (start the head with "
                 "--resources='{\"trial_slot\": 1}'); trials take 0.01 CPU instead, which can starve "
                 "Train workers on small nodes")
        resources = {"CPU": 0.01}
    # The search secret travels through Ray's object store (tune.with_parameters), never
    # through the trial config, which Tune writes to params.json.
    trainable = tune.with_resources(tune.with_parameters(_trainable_with_static(static), search_secret=secret),
                                    resources)
    _kill_driver("before_trials")  # fault tests: charged and planned, no trial started
    if k == 0:
        progress("the drawn number of trials is 0 (Poisson): nothing is trained; the release holds only the report")
        results = None
    elif resume and (Path(storage) / name).exists():
        tuner = tune.Tuner.restore(str(Path(storage) / name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
        results = tuner.fit()
    else:
        check_no_trials_beside_fresh_tuner(out, Path(storage) / name)  # again, at the last moment
        space = {p.name: p.optuna_distribution() for p in ss.params}
        sampler = (optuna.samplers.RandomSampler(seed=state["sampler_seed"]) if ss.search == "random"
                   else optuna.samplers.TPESampler(seed=state["sampler_seed"]))
        searcher = OptunaSearch(space=space or None, metric="score", mode="max", sampler=sampler)
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=FIFOScheduler(), num_samples=k,
                                        max_concurrent_trials=ss.max_concurrent_trials),
            run_config=tune.RunConfig(name=name, storage_path=storage, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=0)),
        )
        results = tuner.fit()
    if results is not None:
        # A trial stopped by Ctrl-C is "terminated" for Tune but never wrote its trial.json:
        # count the trials that finished (trial.json) plus those that crashed (a crash is a run).
        done = len(finished_trial_files(out)) + results.num_errors
        if done < k:  # e.g. Ctrl-C: releasing the best of fewer than K runs would truncate K
            raise SearchInterrupted(
                f"the search stopped after {done} finished trials; nothing was released. "
                f"Continue it with: python tune.py --resume {out}")
    return finish_search(ss, state, out, results, progress)


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


class SearchInterrupted(RuntimeError):
    pass


def finished_trial_files(out: Path) -> list[Path]:
    """trial.json is written only when a trial has trained and been scored."""
    return sorted((out / "trials").glob("*/trial.json"))


class TrialCheckpointSink:
    """An in-process trial's checkpoints (TRIAL/checkpoint/, private: they hold the trial secret), from
    which a restarted trial continues, and its progress for Tune's table and the dashboard."""

    def __init__(self, trial_dir: Path) -> None:
        self.dir = Path(trial_dir) / "checkpoint"

    def latest(self) -> dict[str, Any] | None:
        from ..training.checkpoint import read_checkpoint_dir

        return read_checkpoint_dir(self.dir)

    def save(self, state: dict[str, Any], metrics: dict[str, Any]) -> None:
        from ..training.checkpoint import write_checkpoint_dir

        write_checkpoint_dir(self.dir, state)  # secret-bearing: 0700 folder, 0600 files (rule 18)

    def report(self, metrics: dict[str, Any]) -> None:
        import ray.tune

        ray.tune.report({"score": float("nan"), **metrics})  # `score` arrives with the final report


class NamedTrial:
    """Mixin for Tune's trial actor: its repr (the name the dashboard and the log prefixes show)
    becomes the trial's name instead of the generic function name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        name = getattr(self, "trial_name", None)
        if name:
            self._name = f"dpaf_trial[{name}]"


def _trainable_with_static(static: dict[str, Any]) -> Callable[..., None]:
    def dpaf_trial(config: dict[str, Any], search_secret: RunSecret | None = None) -> None:
        run_trial({**config, "_static": static}, search_secret)

    dpaf_trial.__mixins__ = (NamedTrial,)  # kept by tune.with_parameters
    return dpaf_trial


RELEASE_DIR = "release"
NOT_TRIAL_DIRS = ("ray_tune", "ray_train")  # Tune's and Train's default storage, beside the trial folders


class SearchRefused(ConfigError):
    """A run directory a search cannot continue soundly as it stands; the message names the folder and the
    operator's choices (exit code 2, and nothing already written is touched)."""


def trial_folders(out: Path) -> list[Path]:
    """Every trial that started: its folder in OUT/trials, made before it reads data or charges anything.
    Counted from the disk, not from what Tune says: a Tune experiment can be lost or replaced."""
    root = Path(out) / "trials"
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name not in NOT_TRIAL_DIRS) if root.exists() else []


def released_message(out: Path) -> str:
    """Where an existing release is and what it cost (from its own report)."""
    report_path = Path(out) / RELEASE_DIR / "privacy_report.json"
    try:
        report = json.loads(report_path.read_text())
        cost = f"ε={report['epsilon']:.3f} at δ={report['delta']:g} (target ε={report['target_epsilon']:g})"
    except (OSError, ValueError, KeyError) as err:
        cost = f"its report could not be read ({err})"
    return (f"the search in {out} is already released: {Path(out) / RELEASE_DIR}, {cost}. Nothing was run and the "
            "release was not touched; a new search needs another --out")


def check_no_earlier_search(out: Path) -> None:
    """A new search never starts where an earlier one left trials or a charged ledger without its state."""
    folders = trial_folders(out)
    if folders or (Path(out) / "ledger.json").exists():
        held = f"{len(folders)} trial folder(s) in {Path(out) / 'trials'}" if folders else "a charged ledger.json"
        raise SearchRefused(f"{out} holds {held} of an earlier search but no trials/{STATE_FILE}: a new search there "
                            "would mix its trials with them or overwrite what was charged; use another --out")


def check_no_trials_beside_fresh_tuner(out: Path, tune_experiment: Path) -> None:
    """A fresh Tuner runs K new trials: never beside trials already in OUT/trials, which the release
    would then select among (more than the K the ledger charges)."""
    folders = trial_folders(out)
    if not folders:
        return
    listed = ", ".join(p.name for p in folders[:5]) + (", …" if len(folders) > 5 else "")
    raise SearchRefused(
        f"--resume {out}: Tune's experiment folder {tune_experiment} is missing (another --storage-path, or "
        f"deleted), but {Path(out) / 'trials'} already holds {len(folders)} trial folder(s) ({listed}). A fresh "
        "Tuner would run the drawn number of trials again beside them and select among more than the ledger "
        f"charges. Either resume with the --storage-path under which `{tune_experiment.name}/` lives, or delete "
        f"those trial folders to run the search's trials afresh: {Path(out) / 'ledger.json'} stays as charged "
        "(nothing already charged is refunded) and only the new trials are selected from")


def check_selection_within_k(out: Path, k: int) -> None:
    """The release selects among at most the K trials the ledger charged (finished or failed: every trial
    folder is a run)."""
    folders = trial_folders(out)
    if len(folders) > k:
        raise SearchRefused(
            f"{Path(out) / 'trials'} holds {len(folders)} trial folders, more than the number of trials this "
            f"search drew and charged (kept in trials/{STATE_FILE}): releasing the best of them would select "
            "among more runs than the ledger covers, so nothing is released. Trial folders from another attempt "
            "were added to this run directory; remove them (keep this search's own), then --resume")


def _killable(artefacts: Path | Callable[[Path], Any]) -> Callable[[Path], None]:
    """The release's artefacts written into release.tmp, with the fault tests' kill point after them."""
    from ..release import ARTEFACT_FILES

    def write(directory: Path) -> None:
        if callable(artefacts):
            artefacts(directory)
        else:
            for name in ARTEFACT_FILES:
                shutil.copy2(Path(artefacts) / name, directory / name)
        _kill_driver("writing_release")

    return write


def finish_search(ss: SearchSpace, state: dict[str, Any], out: Path, results: Any,
                  progress: Callable[[str], None]) -> Path:
    """Release the best finished trial with the search's report. With K ≥ 1 and no trial
    finished, the trials touched the data, so ε is gone: the release holds only the report,
    and `SearchFailed` carries the first trial's error (the command exits non-zero)."""
    from ..release import write_release
    from ..release import generate, label_balance_warning, write_artefacts
    from .results import load_trials, plot_trials

    if (out / RELEASE_DIR).exists():
        raise SearchRefused(f"{out / RELEASE_DIR} exists: a release is never rewritten (a second release would be "
                            f"charged nowhere). {released_message(out)}")
    check_selection_within_k(out, state["num_trials"])
    _kill_driver("finish_search")  # fault tests
    trials = load_trials(out)
    finished = [t for t in trials if t.status == "finished"]
    best_trial = max(finished, key=lambda t: t.score) if finished else None
    best = json.loads((best_trial.path / "trial.json").read_text()) if best_trial else None
    warning = best.get("warning") if best else None  # about the released set: the best trial's
    if best:
        score = {"score": best["score"], "kind": best["score_kind"],
                 "noise_multiplier": best["score_noise_multiplier"],
                 "expected_validation": best["expected_validation"]}
    else:
        score = {"score": None, "note": "no trial finished: nothing usable was released"
                 if state["num_trials"] else "K = 0 trials were drawn: nothing was trained"}
    if ss.subsample_fraction is None:
        report = search_privacy_report(ss, state, best["knobs"] if best else None)
        release = write_release(out, _killable(best_trial.path) if best_trial else None, score, report)
    else:  # the best knobs trained once on all records; that generator is released
        final = run_final(ss, state, out, best["knobs"], progress) if best else None
        report = subsampled_privacy_report(ss, state, best["knobs"] if best else None, final)
        if best:
            score["note"] = ("the best trial's noisy score on the subsample's validation split (part of the search's "
                             "ε); the released generator is the final run's, trained on all records, and is not scored")
        generator = final.trainer.released_generator().eval() if final else None
        synthetic = generate(generator, ss.num_synthetic) if final else None
        release = write_release(out, _killable(lambda d: write_artefacts(d, generator, ss.num_synthetic,
                                                                        synthetic=synthetic))
                                if final else None, score, report)
        if final:  # the released set is the final run's, not the best trial's
            warning = label_balance_warning(generator, synthetic)
    plot_trials(trials, out / "trials" / "comparison.png")
    if best:
        progress(f"release: {release} (ε={report['epsilon']:.3f}, δ={ss.delta:g}; best noisy score "
                 f"{best['score']:.3f})")
        for line in time_cap_lines(trials, best_trial, out, ss.subsample_fraction is None):
            progress(f"WARNING: {line}")
        if warning:
            progress(f"WARNING: {warning}")
    elif state["num_trials"]:
        first = next((t for t in trials if t.error), None)
        raise SearchFailed(
            f"no trial finished ({len(trials)} started); the first error: "
            f"{first.error if first else 'unknown (see the Ray logs)'}. The trials touched the data, so the "
            f"search's ε={report['epsilon']:.3f} is spent, and nothing usable was released "
            f"({release} holds only the privacy report). Inspect: python -m dpaf_ray results {out}")
    else:
        progress(f"release: {release} (K = 0: nothing trained; ε={report['epsilon']:.3f})")
    return release


def time_cap_lines(trials: list[Any], best_trial: Any, out: Path, released_is_best: bool) -> list[str]:
    """The search's summary of trials cut by trial.time_budget_minutes: the released one, and how many."""
    cut = [t for t in trials if t.stopped_early]
    if not cut:
        return []
    lines = []
    if best_trial is not None and best_trial.stopped_early and released_is_best:
        lines.append(f"the released trial {best_trial.name} was cut by its time cap after {best_trial.iterations} of "
                     f"{best_trial.iterations_planned} planned iterations: it trained less than planned")
    lines.append(f"{len(cut)} of {len(trials)} trials were cut by trial.time_budget_minutes (each charged its full "
                 f"share); raise the cap or lower trial.iterations. Per trial: python -m dpaf_ray results {out}")
    return lines


class SearchFailed(RuntimeError):
    """No trial of the search finished."""


# --- a subsampled search's final run (issue #14) ------------------------------------------------
FINAL_DIR = "final"  # OUT/final: the final run's ledger, checkpoint (its own secret) and config; private


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


def run_final(ss: SearchSpace, state: dict[str, Any], out: Path, knobs: dict[str, Any],
              progress: Callable[[str], None]) -> Any:
    """Train the released knobs once on all records in OUT/final, at ε_f = ε − amplified ε_s (from
    the search's ledger) and δ_f. Its secret is fresh (kept in OUT/final/checkpoint/), independent of
    the search's. A final run cut short resumes from its checkpoint, or carries its journaled spend
    forward, like `dpaf_ray train`."""
    from ..run import train_private

    budget = ss.subsample_budget()
    eps_f = budget.final_epsilon(search_ledger(ss, state))
    cfg = final_config(ss, knobs, eps_f, budget.final_delta)
    progress(f"final run on all {state['n_records']} records with the best trial's knobs: ε_f={eps_f:.3f}, "
             f"δ_f={budget.final_delta:g}")
    result, _ = train_private(cfg, out / FINAL_DIR, ss.num_workers, ss.use_gpu, None, True,
                              lambda m: progress(f"final: {m}"), ss.gpus_per_worker, ss.cpus_per_worker)
    return result


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


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


