"""Private hyperparameter search with Ray Tune + Optuna (DESIGN §6).

    K ← TNB/logarithmic/Poisson(mean) from a cryptographic RNG      (random search; TPE: fixed K)
    reference ← largest curve whose repeat-and-select (or K-fold composition) meets (ε, δ)
    each trial: config ~ Optuna (RandomSampler or TPE), T and σ fitted under the reference,
                train (Ray Train, W workers), noisy validation score, ledger checked ≤ reference
    release: the best trial by noisy score + the search's privacy report

Trials run FIFO, never stopped early from other trials' results. Tune and the dashboard see
only DP values: noisy scores, ε, losses computed from released aggregates.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig
from ..privacy.ledger import PrivacyLedger
from ..privacy.randomness import RunSecret
from ..privacy.report import data_assumptions, privacy_report
from ..privacy.tuning import (
    Reference,
    calibrate_reference,
    check_trial_under_reference,
    distribution_shape,
    fit_trial,
    sample_num_trials,
    search_entries,
)
from .search_space import SearchSpace

STATE_FILE = "search_state.json"


# --- the search plan (kept in the trusted run directory) -------------------------------------
def plan_search(ss: SearchSpace, n_records: int) -> dict[str, Any]:
    """K, the reference and the sampler's seed; data-independent given the public N."""
    shape = distribution_shape(ss.trials_distribution, ss.tnb_shape)
    score_noise = None if ss.public_validation else ss.score_noise
    fraction = float(ss.fixed.get("validation_fraction", TrainConfig.validation_fraction))
    q_ref = ss.reference_batch_size / ((1 - fraction) * n_records)
    reference = calibrate_reference(ss.epsilon, ss.delta, q_ref, ss.reference_noise, score_noise,
                                    ss.search, ss.expected_trials, shape)
    if ss.search == "random":
        k = sample_num_trials(ss.expected_trials, shape)  # cryptographic; never re-drawn
    else:
        k = int(ss.expected_trials)
    return {"num_trials": k, "shape": shape, "reference": dataclasses.asdict(reference),
            "sampler_seed": secrets.randbits(31), "created": time.time(), "search_space": ss.to_dict(),
            "n_records": n_records}


def reference_from(state: dict[str, Any]) -> Reference:
    r = dict(state["reference"])
    r["orders"] = tuple(r["orders"])
    return Reference(**r)


def search_ledger(ss: SearchSpace, state: dict[str, Any]) -> PrivacyLedger:
    """What the whole search is charged: written to OUT/ledger.json before any trial runs."""
    reference = reference_from(state)
    return PrivacyLedger(search_entries(reference, ss.search, ss.expected_trials, state["shape"]), reference.orders)


def search_privacy_report(ss: SearchSpace, state: dict[str, Any], best_knobs: dict[str, Any] | None,
                          shape: tuple[int, int, int] | None = None, num_classes: int | None = None) -> dict[str, Any]:
    """The release's report: ε of the whole search, from the search ledger."""
    reference = reference_from(state)
    fraction = float(ss.fixed.get("validation_fraction", TrainConfig.validation_fraction))
    assumptions = data_assumptions(state["n_records"], fraction, num_classes or 0, shape or (0, 0, 0))
    assumptions["search"] = ("every trial's executed RDP curve lies under the reference at every order; the "
                             "number of trials K is drawn with a cryptographic RNG and kept private")
    return privacy_report(
        search_ledger(ss, state), delta=ss.delta, target_epsilon=ss.epsilon, reproducible_noise=False,
        assumptions=assumptions,
        extra={"search": ss.search,
               "trials_distribution": {"kind": ss.trials_distribution, "mean": ss.expected_trials,
                                       "shape": "inf" if math.isinf(state["shape"]) else state["shape"]},
               "reference": {"sampling_rate": reference.sampling_rate,
                             "noise_multiplier": reference.noise_multiplier,
                             "iterations": reference.iterations, "score_noise_multiplier": reference.score_noise},
               "knobs": best_knobs})


# --- one trial ---------------------------------------------------------------------------------
def run_trial(config: dict[str, Any], search_secret: RunSecret | None = None) -> None:
    """A Tune function trainable: fit T under the reference, train, score, report.

    Its private randomness comes from the search secret: the split (one for all trials) and
    the trial's own secret, a child keyed by the trial id. A trial that Tune restarts from
    scratch therefore repeats the same releases exactly, and reveals nothing new."""
    import ray.tune
    from ray.tune import Checkpoint

    from ..data import load_dataset, load_training_data, write_parquet
    from ..data.splits import SPLIT_LABEL
    from ..training.loop import WriteAheadLedger, train_loop
    from ..training.outputs import write_artefacts
    from ..training.plan import TrainingPlan, schedule_for
    from .resources import synthesise_and_fit, trial_device
    from .scoring import score_trial

    if search_secret is None:
        raise RuntimeError("a trial needs the search secret (pass it with tune.with_parameters)")
    static = config["_static"]
    ss = SearchSpace(**{**static["search_space"], "params": []})
    reference = reference_from(static)
    sampled = {k: v for k, v in config.items() if k != "_static"}
    context = ray.tune.get_context()
    trial_name, trial_id = context.get_trial_name(), context.get_trial_id()
    trial_secret = search_secret.child(f"trial/{trial_id}")
    split_key = search_secret.child(SPLIT_LABEL)
    cfg = TrainConfig.from_dict({**ss.fixed, **sampled, "dataset": ss.dataset, "data_root": ss.data_root,
                                 "epsilon": ss.epsilon, "delta": ss.delta, "num_classes": ss.num_classes,
                                 "seed": secrets.randbits(31), "time_budget_minutes": ss.time_budget_minutes})
    cfg = dataclasses.replace(cfg, group_size=min(cfg.group_size, cfg.batch_size))  # as clamp_group
    data = load_training_data(cfg, split_key)
    score_noise = None if ss.public_validation else ss.score_noise
    schedule = schedule_for(cfg, data.expected_train)
    fit = fit_trial(schedule, score_noise, reference, ss.min_iterations, ss.max_iterations)
    base_agg, base_sgd = cfg.base_sigmas()  # as sampled, or the noise split at σ_sgd = 1
    cfg = dataclasses.replace(cfg, iterations=fit.iterations, sigma_agg=base_agg * fit.noise_factor,
                              sigma_sgd=base_sgd * fit.noise_factor)
    cfg.validate(data.expected_train)
    plan = TrainingPlan(cfg, schedule_for(cfg, data.expected_train), fit.iterations, float("nan"), fit.noise_factor)
    trial_dir = Path(static["trials_dir"]) / trial_name
    trial_dir.mkdir(parents=True, exist_ok=True)
    journal = WriteAheadLedger(trial_dir / "ledger.json")
    if ss.num_workers == 0:
        result = train_loop(plan, data.train, len(data.train), progress=None, secret=trial_secret, journal=journal,
                            device=trial_device(ss))  # the GPU share the trial holds, when use_gpu
    else:
        from ..distributed.ray_train import fit_with_ray_train

        result = fit_with_ray_train(plan, data, ss.num_workers, ss.use_gpu, None, None, None,
                                    secret=trial_secret, split_key=split_key, ledger_path=trial_dir / "ledger.json",
                                    name=f"{trial_name}-train", max_failures=0,
                                    cpus_per_worker=ss.cpus_per_worker, gpus_per_worker=ss.gpus_per_worker,
                                    storage_path=static["train_storage"],
                                    report_defaults={"score": float("nan")})
    ledger = result.ledger
    generator = result.trainer.released_generator().eval()
    # Synthetic set and scoring classifier on the training device (a worker's share, for Ray Train).
    synthetic, classifier = synthesise_and_fit(generator, ss)
    write_artefacts(trial_dir, generator, ss.num_synthetic, synthetic=synthetic)
    if ss.public_validation:
        validation, expected = load_dataset(ss.public_validation, "test", ss.data_root), None
    else:
        validation, expected = data.validation, data.expected_validation
    score = score_trial(synthetic, validation, ledger, score_noise, ss.classifier_epochs, ss.classifier_max_steps,
                        expected_validation=expected, secret=trial_secret, commit=journal.commit, model=classifier)
    check_trial_under_reference(ledger.entries, reference)

    knobs = {k: v for k, v in cfg.to_dict().items() if k not in ("seed", "data_root", "extra_fixed_releases")}
    summary = {"trial": trial_name, "score": score.value, "score_kind": score.kind,
               "score_noise_multiplier": score.noise_multiplier, "expected_validation": score.expected_validation,
               "iterations": result.iterations_done, "noise_factor": fit.noise_factor,
               "epsilon_trial": ledger.epsilon(ss.delta), "knobs": knobs, "sampled": sampled,
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

    directory = out / "checkpoint"
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / (SECRET_FILE + ".tmp")
    torch.save(secret.to_checkpoint(), tmp)
    os.chmod(tmp, 0o600)
    tmp.replace(directory / SECRET_FILE)


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

    from ..data import load_dataset
    from .resources import check_search_hardware, trial_resources

    # Before anything is written or charged: the search fits this machine or the cluster
    # (max_concurrent_trials × workers × GPU share), so no trial waits for resources forever.
    check_search_hardware(ss, address)
    out = out.absolute()
    trials_dir = out / "trials"
    state_path = trials_dir / STATE_FILE
    if resume:
        if not state_path.exists():
            raise FileNotFoundError(f"--resume {out}: no {STATE_FILE} there; start a new search with --out")
        state = json.loads(state_path.read_text())
        secret = load_search_secret(out)
        progress(f"resuming the search in {out}")
    else:
        if state_path.exists():
            raise FileExistsError(f"{out} already holds a search; use --resume {out} or another --out")
        base = TrainConfig.from_dict({**ss.fixed, "dataset": ss.dataset, "data_root": ss.data_root,
                                      "num_classes": ss.num_classes})
        n_records = len(load_dataset(base.dataset, "train", base.data_root, num_classes=base.num_classes))
        state = plan_search(ss, n_records)
        secret = RunSecret.fresh()
        trials_dir.mkdir(parents=True, exist_ok=True)
        save_search_secret(out, secret)
        search_ledger(ss, state).save(out / "ledger.json")  # the whole search's charge, before any trial
        _atomic_json(state_path, state)  # K is fixed before any trial runs
    reference = reference_from(state)
    k = state["num_trials"]
    report_eps = search_ledger(ss, state).epsilon(ss.delta)
    progress(f"private {ss.search} search on {ss.dataset}: total ε={report_eps:.3f} (target {ss.epsilon:g}, "
             f"δ={ss.delta:g}) covers training, scoring and the search; expected trials {ss.expected_trials:g} "
             f"({ss.trials_distribution}); reference: q={reference.sampling_rate:.4g}, σ={reference.noise_multiplier:g},"
             f" T={reference.iterations}")

    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    from ..distributed.ray_train import ensure_ray

    if address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(address)  # the cluster's head must offer the `trial_slot` resource (see clusters/)
    else:
        ensure_ray(None, resources={"trial_slot": ss.max_concurrent_trials}, include_dashboard=True)
    static = {**state, "trials_dir": str(trials_dir),
              "train_storage": storage_path or str(trials_dir / "ray_train")}
    # The trial itself only waits on its Train workers: it holds a `trial_slot`, not a CPU,
    # so a trial plus its workers never deadlock on a small machine (DESIGN §9).
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
    storage = storage_path or str(trials_dir / "ray_tune")
    name = "search"
    if k == 0:
        progress("the drawn number of trials is 0 (Poisson): nothing is trained; the release holds only the report")
        results = None
    elif resume and (Path(storage) / name).exists():
        tuner = tune.Tuner.restore(str(Path(storage) / name), trainable=trainable,
                                   resume_unfinished=True, resume_errored=False, restart_errored=False)
        results = tuner.fit()
    else:
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


def _trainable_with_static(static: dict[str, Any]) -> Callable[..., None]:
    def dpaf_trial(config: dict[str, Any], search_secret: RunSecret | None = None) -> None:
        run_trial({**config, "_static": static}, search_secret)

    return dpaf_trial


def finish_search(ss: SearchSpace, state: dict[str, Any], out: Path, results: Any,
                  progress: Callable[[str], None]) -> Path:
    from ..release import write_release

    trials = [json.loads(p.read_text()) for p in finished_trial_files(out)]
    best = max(trials, key=lambda t: t["score"]) if trials else None
    report = search_privacy_report(ss, state, best["knobs"] if best else None,
                                   tuple(best["shape"]) if best else None, best["num_classes"] if best else None)
    score = None
    if best:
        score = {"score": best["score"], "kind": best["score_kind"],
                 "noise_multiplier": best["score_noise_multiplier"],
                 "expected_validation": best["expected_validation"]}
    release = write_release(out, out / "trials" / best["trial"] if best else None, score, report)
    _plot_trials(trials, out / "trials" / "comparison.png")
    progress(f"release: {release} (ε={report['epsilon']:.3f}, δ={ss.delta:g}; best noisy score "
             f"{best['score']:.3f})" if best else f"release: {release} (no trial finished)")
    return release


def _plot_trials(trials: list[dict[str, Any]], path: Path) -> None:
    """Scores against each searched knob, for the operator (kept in trials/)."""
    if not trials:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    knobs = sorted({k for t in trials for k in t["sampled"]}) or ["iterations"]
    fig, axes = plt.subplots(1, len(knobs), figsize=(3.2 * len(knobs), 3), squeeze=False)
    for ax, k in zip(axes[0], knobs):
        xs = [t["sampled"].get(k, t.get(k)) for t in trials]
        ax.scatter(xs, [t["score"] for t in trials])
        ax.set_xlabel(k)
        ax.set_ylabel("noisy validation score")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _atomic_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


