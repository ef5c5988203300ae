"""One private training run, from a configuration to a release (above training and Ray).

    secret   fresh 256-bit run secret (or the one in OUT's checkpoint, to resume)
    data     loaded, split by a keyed hash under the secret (rule 14)
    plan     T and σ from (ε, δ), with spend carried forward from an earlier attempt in OUT
    train    in-process (`training.loop`) or over Ray Train workers (`ray_train`),
             every window charged to OUT/ledger.json before it runs (rule 16)
    release  OUT/release/: generator, synthetic data, samples, score, privacy report (rule 15)

OUT also holds, for the operator only: config.json (with the public seed), metrics.json,
curves.png, ledger.json and checkpoint/ (which holds the run secret: never publish it).
"""
from __future__ import annotations

import dataclasses
import json
import secrets
import time
from pathlib import Path
from typing import Any, Callable

from .config import ConfigError, TrainConfig
from .data import PrivateData, load_training_data
from .data.splits import SPLIT_LABEL
from .devices import DeviceError, gpu_device, local_gpu_count, test_gpu_stand_in  # noqa: F401 (DeviceError: API)
from .pictures import save_curves
from .privacy.calibration import warn_large_delta
from .privacy.ledger import PrivacyLedger
from .privacy.randomness import RunSecret
from .privacy.report import data_assumptions, privacy_report
from .ray_resources import check_cpu_share, check_gpu_fraction
from .ray_train import train_on
from .release import (RELEASE_DIR, estimate_release_seconds, generate, label_balance_warning, write_artefacts,
                      write_release)
from .run_dir import own_run_dir
from .training.checkpoint import LocalCheckpointSink
from .training.loop import TrainResult, WriteAheadLedger, secret_for, time_cap_note
from .training.plan import TrainingPlan, plan_training
from .training.preflight import preflight as check_plan
from .training.probe import seconds_per_iteration

LEDGER_FILE = "ledger.json"


def resolve_seed(cfg: TrainConfig) -> TrainConfig:
    """The public seed (initialisation, generated codes); drawn at random when not given."""
    if cfg.seed is None:
        return dataclasses.replace(cfg, seed=secrets.randbits(31))
    return cfg


def prepare(cfg: TrainConfig, secret: RunSecret | None = None, carried: PrivacyLedger | None = None,
            device: str = "cpu", started: float | None = None,
            num_synthetic: int = 0) -> tuple[TrainConfig, PrivateData, TrainingPlan, RunSecret]:
    """Every check before anything is written: configuration, data, budget, plan.

    `started` (time.monotonic() when the command began): a time budget then covers the whole command,
    so the plan takes off what was spent before training and an estimate for writing the release."""
    cfg = resolve_seed(cfg.validate())
    secret = secret if secret is not None else secret_for(cfg)
    data = load_training_data(cfg, secret.child(SPLIT_LABEL))
    warn_large_delta(cfg.delta, data.n_records)
    if carried is not None and carried.entries:  # an earlier attempt's spend counts against the budget
        cfg = dataclasses.replace(cfg, extra_fixed_releases=cfg.extra_fixed_releases
                                  + [e.to_json() for e in carried.entries])
    speed = None
    if cfg.time_budget_minutes is not None and cfg.iterations is None and cfg.epochs is None:
        cfg.validate(data.expected_train)  # the probe needs a valid batch
        speed = seconds_per_iteration(cfg, data.shape, data.num_classes, data.expected_train, device)
    overhead = None
    if speed is not None and started is not None:
        release = estimate_release_seconds(data.shape, data.num_classes, num_synthetic, cfg.z_dim)
        overhead = time.monotonic() - started + release
    plan = plan_training(cfg, data.expected_train, data.shape[1], speed, overhead)
    return plan.config, data, plan, secret


def resolve_device(use_gpu: bool, num_workers: int) -> str:
    """The in-process training device (raises DeviceError for --use-gpu without a GPU); Ray
    Train workers get theirs from Ray."""
    if not use_gpu or num_workers > 0:
        return "cpu"
    return gpu_device("--use-gpu")


def probe_device(use_gpu: bool, num_workers: int) -> str:
    """Where the driver computes (the speed probe of a time budget, and the release: generator,
    synthetic set, sample grid): the training device, or for Ray Train workers on GPUs the driver's
    GPU when it has one (a CPU probe would plan far too few iterations), else its CPU."""
    if use_gpu and num_workers > 0:
        return gpu_device("--use-gpu") if local_gpu_count() or test_gpu_stand_in() else "cpu"
    return resolve_device(use_gpu, num_workers)


def run_train(cfg: TrainConfig, out: str | Path, num_synthetic: int = 10_000, num_workers: int = 0,
              use_gpu: bool = False, address: str | None = None, resume: bool = True,
              progress: Callable[[str], None] | None = print, gpus_per_worker: float = 1.0,
              cpus_per_worker: float = 1.0, force: bool = False) -> dict[str, Any]:
    """`force`: train a plan the pre-flight refuses (`training.preflight`) anyway.
    `gpus_per_worker`: each Ray Train worker's share of a GPU (< 1: workers share one);
    `cpus_per_worker`: the CPUs Ray reserves per worker, checked and requested with one value.
    Both are validated here, the one boundary the CLI and the Python API share.

    A finished OUT is final (docs/design.md rule 17): its release is reported, never rewritten.
    A time budget covers the whole command, from here to the release written."""
    started = time.monotonic()
    finished = finished_run(Path(out))
    if finished is not None:
        if not resume:
            raise ConfigError(f"--no-resume: {Path(out) / 'release'} already holds a finished release, which is never "
                              "rewritten; train into a new --out")
        if progress:
            progress(finished_message(Path(out), finished))
        return finished
    result, data = train_private(cfg, out, num_workers, use_gpu, address, resume, progress, gpus_per_worker,
                                 cpus_per_worker, preflight=not force, started=started, num_synthetic=num_synthetic)
    metrics = finish_run(Path(out), result, data, num_synthetic, num_workers, probe_device(use_gpu, num_workers))
    if progress and "warning" in metrics:
        progress(f"WARNING: {metrics['warning']}")
    if progress:
        progress(f"done: {result.iterations_done} iterations, ε={metrics['epsilon']:.3f} (δ={result.plan.config.delta:g}); "
                 f"release in {Path(out) / 'release'}")
        if result.stopped_early:
            progress(f"WARNING: the released generator was {metrics['time_cap']}; ε={metrics['epsilon']:.3f} of "
                     f"{result.plan.config.epsilon:g} is spent, the rest is not")
    return metrics


def finished_run(out: Path) -> dict[str, Any] | None:
    """The metrics of a run whose release is written (what it cost from its ledger), or None."""
    report_path = out / RELEASE_DIR / "privacy_report.json"
    if not report_path.is_file():
        return None
    report = json.loads(report_path.read_text())
    metrics_path = out / "metrics.json"
    metrics: dict[str, Any] = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    ledger_path = out / LEDGER_FILE
    delta = float(report["delta"])
    epsilon = PrivacyLedger.load(ledger_path).epsilon(delta) if ledger_path.is_file() else float(report["epsilon"])
    return {**metrics, "epsilon": epsilon, "delta": delta, "target_epsilon": report.get("target_epsilon"),
            "finished": True}


def finished_message(out: Path, finished: dict[str, Any]) -> str:
    target = finished.get("target_epsilon")
    of = f" of {target:g}" if isinstance(target, (int, float)) else ""
    cut = f" Its generator was {finished['time_cap']}." if finished.get("time_cap") else ""
    return (f"{out} is a finished run: its release is {out / RELEASE_DIR} and it cost ε={finished['epsilon']:.3f}{of} "
            f"(δ={finished['delta']:g}, from {out / LEDGER_FILE}).{cut} Nothing was trained, charged or rewritten; "
            "a new run needs a new --out")


def train_private(cfg: TrainConfig, out: str | Path, num_workers: int = 0, use_gpu: bool = False,
                  address: str | None = None, resume: bool = True, progress: Callable[[str], None] | None = print,
                  gpus_per_worker: float = 1.0, cpus_per_worker: float = 1.0,
                  preflight: bool = False, started: float | None = None,
                  num_synthetic: int = 0) -> tuple[TrainResult, PrivateData]:
    """Plan and train one run in OUT (ledger, checkpoints, config.json), without writing a release:
    `run_train` releases it on its own; a subsampled search's final run is released with the
    search's report instead (`tuning.tuner`). `preflight`: refuse a fresh plan measured not to
    learn before anything is charged (a resumed one was checked, and charged, before)."""
    gpus_per_worker = check_gpu_fraction(gpus_per_worker, "--gpus-per-worker")
    cpus_per_worker = check_cpu_share(cpus_per_worker, "--cpus-per-worker")
    out = Path(out)
    journal = WriteAheadLedger(out / LEDGER_FILE)
    sink = LocalCheckpointSink(out, resume)
    state = sink.latest() if num_workers == 0 else None
    secret = None
    if state is not None:  # resume: the same secret (so the same split) and the configuration as planned
        secret = RunSecret.from_checkpoint(state["secret"])
        saved = TrainConfig.from_dict(state["config"])  # planned_iterations counts a classifier phase too
        cfg = dataclasses.replace(saved, iterations=state["planned_iterations"] - saved.prefix_iterations)
    carried = journal.load() if state is None else None
    device = resolve_device(use_gpu, num_workers)
    cfg, data, plan, secret = prepare(cfg, secret, carried,  # every check before anything is written
                                      probe_device(use_gpu, num_workers), started, num_synthetic)
    if preflight and state is None and not (carried is not None and carried.entries):
        check_plan(plan, data.expected_train, data.num_classes, data.shape[1], data.validation_fraction)
    if num_workers > 0:  # the cluster can hold the workers (GPU shares included), before anything is written
        from .auth_token import protect_auth_token
        from .ray_train import check_resources, ensure_ray

        protect_auth_token(address)  # before Ray can write ~/.ray/auth_token with the umask
        ensure_ray(address)
        check_resources(num_workers, use_gpu, cpus_per_worker, gpus_per_worker)
    own_run_dir(out)  # 0700: nothing in OUT is readable by others (rule 18)
    if progress:
        if carried is not None and carried.entries:
            progress(f"an earlier attempt in {out} already spent ε={carried.epsilon(cfg.delta):.3f}; "
                     "it is carried forward and this run spends the rest of the budget")
        progress(f"{cfg.model} on {cfg.dataset}: N={data.n_records} records (public), ε={cfg.epsilon:g}, "
                 f"δ={cfg.delta:g}")
        for line in plan.describe():
            progress(line)
        if cfg.reproducible_noise:
            progress("WARNING: --reproducible-noise: the noise is derived from the public seed; this run is NOT private")
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    result = train_on(plan, data, num_workers, use_gpu, progress, secret=secret, journal=journal,
                      initial_ledger=carried, sink=sink, device=device,  # in-process
                      address=address, out=out, split_key=secret.child(SPLIT_LABEL),  # Ray Train
                      gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker)
    if num_workers > 0:
        journal.commit(result.ledger)
    return result, data


def finish_run(out: Path, result: TrainResult, data: PrivateData, num_synthetic: int,
               num_workers: int, device: str | None = None) -> dict[str, Any]:
    """The release (publishable) and the operator's files beside it, generated on `device`
    (default: where the trainer's generator is)."""
    cfg = result.plan.config
    generator = result.trainer.released_generator().eval()
    if device is not None:
        generator = generator.to(device)
    report = privacy_report(
        result.ledger, delta=cfg.delta, target_epsilon=cfg.epsilon, reproducible_noise=cfg.reproducible_noise,
        assumptions=data_assumptions(data.n_records, cfg.validation_fraction, data.num_classes, data.shape,
                                     cfg.batch_size, class_names=data.train.class_names),
        extra={"iterations_executed": result.iterations_done, "iterations_planned": result.plan.iterations,
               **({"time_cap": time_cap_note(result.iterations_done, result.plan.iterations, cfg.time_budget_minutes)}
                  if result.stopped_early else {}),
               "sampling_rate": result.plan.schedule.sampling_rate, "model": cfg.model, "knobs": released_knobs(cfg)})
    score = {"score": None, "note": "a single training run is not scored; tune.py scores each trial on the "
                                    "private validation split with noise, charged to the ledger"}
    synthetic = generate(generator, num_synthetic)
    write_release(out, lambda d: write_artefacts(d, generator, num_synthetic, synthetic=synthetic), score, report)
    if result.history.get("iteration"):
        save_curves(result.history, out / "curves.png")
    metrics = {
        "epsilon": report["epsilon"],
        "iterations_executed": result.iterations_done,
        "iterations_planned": result.plan.iterations,
        "stopped_early": result.stopped_early,
        **({"time_cap": time_cap_note(result.iterations_done, result.plan.iterations, cfg.time_budget_minutes)}
           if result.stopped_early else {}),
        "train_seconds": result.seconds,
        "seconds_per_iteration": result.seconds / max(1, result.iterations_done),
        "num_synthetic": num_synthetic,
        "seed": cfg.seed,
        "num_workers": num_workers,
    }
    if warning := label_balance_warning(generator, synthetic):
        metrics["warning"] = warning
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return metrics


# Knobs that stay in the trusted run directory: the public seed is harmless, but a release
# has no use for it; extra_fixed_releases is internal.
_NOT_RELEASED = {"seed", "data_root", "extra_fixed_releases"}


def released_knobs(cfg: TrainConfig) -> dict[str, Any]:
    return {k: v for k, v in cfg.to_dict().items() if k not in _NOT_RELEASED}


__all__ = ["run_train", "train_private", "prepare", "load_training_data", "finish_run", "TrainResult"]
