"""One trial of the search: the Tune trainable (`run_trial`), its plan file that a restart replays,
its checkpoints, and the fault tests' kill hooks that the trials and the search (`tuner`) share.
Below `tuner` and above `reference`: the search imports it, never the other way round."""
from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig
from ..privacy.ledger import Gaussian
from ..privacy.randomness import RunSecret
from ..privacy.tuning import TrialFit, check_trial_under_reference
from .reference import plan_trial, reference_from, trial_config, training_epsilon, under_reference
from .search_space import SearchSpace


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
    # Taken now: the hook may run on a Ray Train worker (rank 0), whose environment need not be the trial's.
    env = {k: os.environ[k] for k in (KILL_DRIVER_ENV, DRIVER_PID_ENV) if k in os.environ}

    def hook(t: int) -> None:
        if t == at:
            os.environ.update(env)
            _kill_driver(phase, f"{label}:{t}")

    return hook


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
    from ..training.loop import WriteAheadLedger, time_cap_note
    from ..ray_train import console_line, train_on
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
    # In process: the GPU share the trial holds, when use_gpu (Ray Train workers get theirs from Ray).
    device = trial_device(ss) if ss.num_workers == 0 else "cpu"
    result = train_on(plan, data, ss.num_workers, ss.use_gpu, lambda m: console_line(f"{trial_name}: {m}"),
                      secret=trial_secret, journal=journal, replay_charged=True,
                      sink=TrialCheckpointSink(trial_dir), device=device, before_iteration=kill_hook,  # (rank 0 under Train)
                      split_key=split_key, name=f"{trial_name}-train", max_failures=0,  # Ray Train
                      **trial_worker_share(ss), storage_path=static["train_storage"],
                      report_defaults={"score": float("nan")}, subsample=subsample)
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


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)
