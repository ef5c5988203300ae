"""Ray Train glue: shard one training run over W workers with `TorchTrainer` (docs/design.md §5).

Each worker reads the data itself, splits it with the run's split key and keeps only its
contiguous shard; the Poisson sample, the generated batch and the noise come from
iteration-keyed streams (of the run secret, or of the public seed for generated codes),
so the run matches W = 1 up to floating-point summation order. Noise is added once, on
rank 0, before the all-reduce (see `privacy.mechanisms.gaussian_release`).

The run secret reaches the workers inside `train_loop_config`, in memory; its `repr` is
redacted, so Ray's run-state export (which stringifies the config) never shows it.
Rank 0 writes the write-ahead ledger to `ledger_path` (on multi-node clusters, put it on
shared storage; the Ray Train checkpoints hold the ledger too).
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .collectives import LocalCollective, TorchDistributedCollective
from .config import ConfigError
from .data import PrivateData, Subsample, load_training_data
from .devices import gpu_device
from .privacy.ledger import PrivacyLedger
from .privacy.randomness import RunSecret
from .ray_resources import forwarded_env, torch_backend
from .run_dir import private_dir
from .training.checkpoint import CheckpointSink, RayTrainCheckpointSink, read_checkpoint_dir
from .training.loop import TrainResult, WriteAheadLedger, make_trainer, train_loop
from .training.plan import TrainingPlan

FAIL_AT_ENV = "DPAF_TEST_FAIL_AT"  # "ITERATION:RANK:MARKER_FILE": kill that worker once (fault tests)


class ResourceError(ConfigError, RuntimeError):
    """The cluster cannot give the run the resources it asks for (the CLI exits 2 with the message)."""


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Attach to `address` / RAY_ADDRESS, or start a local Ray on 127.0.0.1.

    "local", not None: with no address `ray.init` attaches to the newest cluster started on the
    machine (`ray start`, `ray.cluster_utils.Cluster`), which refuses the resources a local search
    declares and is not what the operator asked for; attaching takes --address or RAY_ADDRESS."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **init_kwargs)
    else:
        init_kwargs.setdefault("include_dashboard", False)
        ray.init(address="local", _node_ip_address="127.0.0.1", **init_kwargs)


def worker_resources(use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float = 1.0) -> dict[str, float]:
    """One Train worker's resources; `gpus_per_worker` < 1 lets workers (and trials) share a GPU."""
    return {"GPU": gpus_per_worker, "CPU": cpus_per_worker} if use_gpu else {"CPU": cpus_per_worker}


def cluster_capacity() -> tuple[dict[str, float], str]:
    """What the connected Ray cluster has, or can autoscale to (as Ray Train itself reads it)."""
    import ray

    now = {k: float(v) for k, v in ray.cluster_resources().items()}
    try:
        from ray._private.state import state

        most = {k: float(v) for k, v in (state.get_max_resources_from_cluster_config() or {}).items()}
    except Exception:  # pragma: no cover - an older or locked-down cluster: what is there now
        most = {}
    cap = {k: max(now.get(k, 0.0), most.get(k, 0.0)) for k in set(now) | set(most)}
    grows = any(most.get(k, 0.0) > now.get(k, 0.0) for k in ("CPU", "GPU"))
    return cap, "the Ray cluster" + (" at its autoscaling maximum" if grows else "")


def check_resources(num_workers: int, use_gpu: bool, cpus_per_worker: float, gpus_per_worker: float = 1.0) -> None:
    """Fail at once, naming what is missing, instead of waiting for resources that do not exist."""
    total, _ = cluster_capacity()  # what the cluster has, or can autoscale to
    need = {k: v * num_workers for k, v in worker_resources(use_gpu, cpus_per_worker, gpus_per_worker).items()}
    missing = {k: (v, total.get(k, 0.0)) for k, v in need.items() if total.get(k, 0.0) < v - 1e-9}
    if missing:
        parts = ", ".join(f"{k}: need {v:g}, cluster has {have:g}" for k, (v, have) in missing.items())
        hint = " or a smaller --gpus-per-worker (workers can share a GPU)" if "GPU" in missing else ""
        hint += f" or a smaller --cpus-per-worker (now {cpus_per_worker:g})" if "CPU" in missing else ""
        raise ResourceError(
            f"{num_workers} Ray Train workers need {parts}; lower --num-workers{hint}, drop --use-gpu, "
            "or add nodes to the cluster"
        )


def worker_loop(config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker."""
    import ray.train

    from .data import shard_indices

    plan: TrainingPlan = config["plan"]
    secret: RunSecret = config["secret"]
    split_key: RunSecret = config["split_key"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(config["threads"])
    # read by this worker, not shipped from the driver (a subsampled search's trial: its subsample only)
    train = load_training_data(plan.config, split_key, config.get("subsample")).train
    idx = shard_indices(len(train), rank, world)
    shard = train.subset(idx)
    collective = TorchDistributedCollective() if world > 1 else LocalCollective()
    device = "cpu"
    if config["use_gpu"]:
        import ray.train.torch

        device = gpu_device("use_gpu")  # raises if this worker sees no CUDA GPU (no silent CPU run)
        if device == "cuda":
            device = str(ray.train.torch.get_device())  # this worker's GPU (fractional workers may share one)
    hook = _failure_hook(rank)
    if rank == 0 and config.get("before_iteration") is not None:  # the caller's hook (fault tests: kill the driver)
        hook = _both(config["before_iteration"], hook)
    initial = config.get("initial_ledger")
    train_loop(plan, shard, len(train), int(idx[0]) if len(idx) else 0, collective,
               RayTrainCheckpointSink(rank, config.get("report_defaults")), _prefixed(config.get("name")) if rank == 0 else None, device,
               before_iteration=hook, secret=secret, journal=WriteAheadLedger(config.get("ledger_path")),
               initial_ledger=PrivacyLedger.from_json(initial) if initial else None,
               replay_charged=bool(config.get("replay_charged")))


def _prefixed(name: str | None) -> Callable[[str], None]:
    return console_line if not name else (lambda message: console_line(f"{name}: {message}"))


def console_line(message: str) -> None:
    """One progress line on the worker's stdout. Not `print`: Ray Train patches `print` on its
    workers to log *and* tee each call, so every line would reach the driver twice."""
    sys.stdout.write(message + "\n")
    sys.stdout.flush()


def _both(first: Callable[[int], None], then: Callable[[int], None] | None) -> Callable[[int], None]:
    def hook(t: int) -> None:
        first(t)
        if then is not None:
            then(t)

    return hook


def _failure_hook(rank: int) -> Callable[[int], None] | None:
    spec = os.environ.get(FAIL_AT_ENV)
    if not spec:
        return None
    at, fail_rank, marker = spec.split(":", 2)
    if int(fail_rank) != rank:
        return None

    def hook(t: int) -> None:
        if t == int(at) and not Path(marker).exists():
            Path(marker).write_text(str(t))
            os._exit(1)  # a worker process dying mid-run, as a lost node would

    return hook


def train_on(plan: TrainingPlan, data: PrivateData, num_workers: int, use_gpu: bool = False,
             progress: Callable[[str], None] | None = print, *, secret: RunSecret, journal: WriteAheadLedger,
             initial_ledger: PrivacyLedger | None = None, replay_charged: bool = False,
             sink: CheckpointSink | None = None, device: str = "cpu",
             before_iteration: Callable[[int], None] | None = None, **ray_train: Any) -> TrainResult:
    """One run's training: in this process (`train_loop`) when `num_workers` is 0, else over that many Ray
    Train workers (`fit_with_ray_train`, given its own keywords in `ray_train`: split_key, address, out, name,
    storage, worker shares). The one dispatch that `run.train_private` and a search's trial share. `sink` and
    `device` are the in-process run's; `before_iteration` runs in this process, or on rank 0 of the Ray Train
    workers (pickled with their config: the fault tests' driver kill). Either way the charges go to `journal`'s
    file."""
    unknown = set(ray_train) - set(inspect.signature(fit_with_ray_train).parameters)
    if unknown:  # checked on both paths, so a misspelt Ray Train keyword fails in a local run too
        raise TypeError(f"train_on: unknown Ray Train keyword(s) {sorted(unknown)}")
    if num_workers == 0:
        return train_loop(plan, data.train, len(data.train), 0, None, sink, progress, device, before_iteration,
                          secret=secret, journal=journal, initial_ledger=initial_ledger,
                          replay_charged=replay_charged)
    return fit_with_ray_train(plan, data, num_workers, use_gpu, progress=progress, secret=secret,
                              ledger_path=journal.path, initial_ledger=initial_ledger,
                              replay_charged=replay_charged, before_iteration=before_iteration, **ray_train)


def fit_with_ray_train(plan: TrainingPlan, data: PrivateData, num_workers: int, use_gpu: bool = False,
                       address: str | None = None, out: str | Path | None = None,
                       progress: Callable[[str], None] | None = print, *, secret: RunSecret, split_key: RunSecret,
                       ledger_path: str | Path | None = None, initial_ledger: PrivacyLedger | None = None,
                       name: str | None = None,
                       max_failures: int = 2, cpus_per_worker: float = 1.0, threads_per_worker: int | None = None,
                       storage_path: str | None = None, report_defaults: dict[str, Any] | None = None,
                       gpus_per_worker: float = 1.0, subsample: Subsample | None = None,
                       replay_charged: bool = False,
                       before_iteration: Callable[[int], None] | None = None) -> TrainResult:
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    ensure_ray(address)
    check_resources(num_workers, use_gpu, cpus_per_worker, gpus_per_worker)
    threads = threads_per_worker or plan.config.num_threads or max(1, int(cpus_per_worker))
    # Its checkpoints hold the run secret: the default storage is a 0700 folder (rule 18).
    storage = storage_path or str(private_dir(Path(out or tempfile.mkdtemp()).absolute() / "ray_train"))
    run_name = name or f"dpaf-train-{int(time.time())}"
    env = {**{k: v for k, v in os.environ.items() if k == FAIL_AT_ENV}, **forwarded_env()}
    trainer = TorchTrainer(
        worker_loop,
        train_loop_config={"plan": plan, "secret": secret, "split_key": split_key, "subsample": subsample, "name": name, "threads": threads, "use_gpu": use_gpu,
                           "report_defaults": report_defaults,
                           "ledger_path": str(ledger_path) if ledger_path is not None else None,
                           "initial_ledger": initial_ledger.to_json() if initial_ledger is not None else None,
                           "replay_charged": replay_charged, "before_iteration": before_iteration},
        # Every collective works on the training device's tensors, and a CPU tensor still finds gloo.
        torch_config=TorchConfig(backend=torch_backend(use_gpu, gpus_per_worker)),
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                     resources_per_worker=worker_resources(use_gpu, cpus_per_worker, gpus_per_worker)),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=3),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": env} if env else None,
            callbacks=_tune_callbacks(),
        ),
    )
    t0 = time.time()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {run_name} finished without a checkpoint: {result.error}")
    with result.checkpoint.as_directory() as d:
        state = read_checkpoint_dir(Path(d))
    return result_from_state(plan, state, data, time.time() - t0)


def result_from_state(plan: TrainingPlan, state: dict[str, Any], data: PrivateData, seconds: float) -> TrainResult:
    """Rebuild the trained models on the driver from the final checkpoint."""
    secret = RunSecret.from_checkpoint(state["secret"])
    trainer = make_trainer(plan.config, data.train, len(data.train), 0, LocalCollective(), "cpu", secret,
                           plan.schedule.sampling_rate, plan.schedule)
    trainer.load_state_dict(state["trainer"])
    ledger = PrivacyLedger.from_json(state["ledger"])
    t = int(state["iteration"])
    return TrainResult(trainer, ledger, plan, t, t < plan.iterations, seconds, state["history"])


def _tune_callbacks() -> list[Any]:
    """Inside a Tune trial, forward Train reports to Tune (docs/design.md §9)."""
    try:
        import ray.tune

        if ray.tune.get_context().get_trial_id() is None:
            return []
        from ray.tune.integration.ray_train import TuneReportCallback

        return [TuneReportCallback()]
    except Exception:
        return []
