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

This module runs the search, releases it and runs a subsampled search's final run; the plan, ledger and
reports are in `reference`, one trial (the Tune trainable) in `trial`.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from ..config import ConfigError
from ..privacy.randomness import RunSecret
from ..privacy.subsample import composed_privacy
from .reference import (
    check_space_fits,
    final_config,
    plan_search,
    reference_from,
    reference_warnings,
    search_ledger,
    search_privacy_report,
    search_records,
    subsampled_privacy_report,
)
from .search_space import SearchSpace
from .trial import DRIVER_PID_ENV, KILL_DRIVER_ENV, _atomic_json, _kill_driver, _trainable_with_static


# --- the search --------------------------------------------------------------------------------
STATE_FILE = "search_state.json"
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
        if release_holds_only_report(out):  # no trial finished, or K = 0: nothing usable to resume into
            raise SearchFailed(f"the search failed: its release holds only the privacy report, no generator. "
                               f"{released_message(out)}")
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



class SearchInterrupted(RuntimeError):
    pass


def finished_trial_files(out: Path) -> list[Path]:
    """trial.json is written only when a trial has trained and been scored."""
    return sorted((out / "trials").glob("*/trial.json"))



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


def release_holds_only_report(out: Path) -> bool:
    """OUT/release is the report alone (finish_search with no finished trial, or K = 0): its score.json
    says score None, or it holds no generator."""
    release = Path(out) / RELEASE_DIR
    try:
        if json.loads((release / "score.json").read_text()).get("score", 0) is None:
            return True
    except (OSError, ValueError, AttributeError):
        pass
    return not (release / "generator.pt").exists()


def released_message(out: Path) -> str:
    """Where an existing release is and what it cost (from its own report)."""
    report_path = Path(out) / RELEASE_DIR / "privacy_report.json"
    try:
        report = json.loads(report_path.read_text())
        cost = f"ε={report['epsilon']:.3f} at δ={report['delta']:g} (target ε={report['target_epsilon']:g})"
    except (OSError, ValueError, KeyError) as err:
        cost = f"its report could not be read ({err})"
    try:  # no trial finished (finish_search's SearchFailed), or K = 0: the release is its report alone
        score = json.loads((Path(out) / RELEASE_DIR / "score.json").read_text())
        if score.get("score", 0) is None:
            cost += f", and it holds only the privacy report ({score.get('note') or 'no generator'})"
    except (OSError, ValueError, AttributeError):
        pass
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
