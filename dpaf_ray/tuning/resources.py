"""What a search asks of the hardware, checked before Ray starts (issue #17).

A trial is either in-process (`trial.num_workers: 0`: the trial itself trains, holding
`cpus_per_worker` CPUs and, with `use_gpu`, `gpus_per_worker` of a GPU) or a Ray Train run of W
workers, each holding `cpus_per_worker` CPUs and `gpus_per_worker` of a GPU, while the trial holds
only a `trial_slot`. `gpus_per_worker` below 1 puts several workers or trials on one GPU, e.g.
4 concurrent trials × 1 worker × 0.25 on a single GPU.

`max_concurrent_trials` trials run side by side, so the search needs

    GPUs = max_concurrent_trials × max(1, W) × gpus_per_worker      (with use_gpu)
    CPUs = max_concurrent_trials × max(1, W) × cpus_per_worker

A search that asks for more than the cluster has would queue trials behind placement groups
that never come (a Ray Train controller gives up after minutes, the trial errors, and an errored
trial counts as a run), so it is refused instead, naming the YAML key and the flag to change:
- `check_declared_hardware`: a search-space file against its own `hardware:` section, when the
  file is loaded;
- `check_hardware`: the resolved search (file plus tune.py flags) against this machine (before a
  local Ray starts) or against the cluster it attaches to (before any trial).

After training, a Ray Train trial generates its synthetic set and trains its scoring classifier in
one Ray task that holds one worker's resources (its GPU share, its CPUs), so that scoring runs on
the same device as training instead of on the 0-CPU trial actor. Only public data goes there (the
generator, its samples); the private validation set never leaves the trial, which computes the
count of correct predictions and adds its noise (`tuning.scoring`).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from ..devices import DeviceError, device_for, local_gpu_count, test_gpu_stand_in
from ..ray_resources import forwarded_env, local_cpu_count
from .search_space_error import SearchSpaceError, key_error

if TYPE_CHECKING:  # pragma: no cover
    from ..data.dataset import ImageDataset
    from ..models.generator import ConditionalGenerator
    from .search_space import SearchSpace

HARDWARE_KEYS = {"cpus", "gpus", "nodes", "note"}
_EPS = 1e-9


def _error(ss: "SearchSpace", key: str, msg: str) -> SearchSpaceError:
    return key_error(ss.path, key, msg)


def slots_per_trial(ss: "SearchSpace") -> int:
    """Resource units one trial holds at a time: its W workers, or itself when in-process."""
    return max(1, ss.num_workers)


def search_needs(ss: "SearchSpace") -> dict[str, float]:
    """CPUs and GPUs the search holds at its peak (max_concurrent_trials trials side by side)."""
    units = ss.max_concurrent_trials * slots_per_trial(ss)
    need = {"CPU": units * ss.cpus_per_worker}
    if ss.use_gpu:
        need["GPU"] = units * ss.gpus_per_worker
    return need


def check_resource_keys(ss: "SearchSpace") -> None:
    """Values each resource key can take on its own."""
    g = ss.gpus_per_worker
    if isinstance(g, bool) or not isinstance(g, (int, float)) or not g > 0 or (g > 1 and g != int(g)) \
            or (g < 1 and round(g, 4) != g):
        raise _error(ss, "trial.gpus_per_worker", "Ray gives a worker either a fraction of one GPU (0 < g ≤ 1, to 4 "
                                                  f"decimal places) or whole GPUs; got {g!r}")
    if ss.max_concurrent_trials < 1:
        raise _error(ss, "trial.max_concurrent_trials", f"must be >= 1, got {ss.max_concurrent_trials}")
    if ss.num_workers < 0:
        raise _error(ss, "trial.num_workers", f"must be >= 0, got {ss.num_workers}")


def check_fit(ss: "SearchSpace", cpus: float, gpus: float, where: str, nodes: int = 1) -> None:
    """The search's peak needs against `cpus` and `gpus` in total (over `nodes` alike nodes)."""
    one = {"CPU": slots_per_trial(ss) * ss.cpus_per_worker,
           "GPU": slots_per_trial(ss) * ss.gpus_per_worker if ss.use_gpu else 0.0}
    if ss.use_gpu and gpus <= 0:
        raise _error(ss, "trial.use_gpu", f"the search trains on GPUs, but {where} has none; set trial.use_gpu: false "
                                          "(or drop --use-gpu), or run it where there are GPUs")
    if ss.use_gpu and ss.gpus_per_worker > gpus / max(1, nodes) + _EPS:
        raise _error(ss, "trial.gpus_per_worker", f"{ss.gpus_per_worker:g} GPUs per worker, but a node of {where} has "
                                                  f"{gpus / max(1, nodes):g}; lower trial.gpus_per_worker "
                                                  "(--gpus-per-worker)")
    if ss.cpus_per_worker > cpus / max(1, nodes) + _EPS:
        raise _error(ss, "trial.cpus_per_worker", f"{ss.cpus_per_worker:g} CPUs per worker, but a node of {where} has "
                                                  f"{cpus / max(1, nodes):g}; lower trial.cpus_per_worker")
    what = f"{ss.num_workers} Ray Train worker(s)" if ss.num_workers else "an in-process trial"
    for res, have in (("GPU", gpus), ("CPU", cpus)):
        if one[res] > have + _EPS:
            key = "trial.gpus_per_worker" if res == "GPU" else "trial.cpus_per_worker"
            raise _error(ss, "trial.num_workers" if ss.num_workers > 1 else key,
                         f"one trial ({what} × {one[res] / slots_per_trial(ss):g} {res}) needs {one[res]:g} {res}s, "
                         f"{where} has {have:g}; lower trial.num_workers (--num-workers) or {key} "
                         f"(--{key.split('.')[1].replace('_', '-')})")
    need = search_needs(ss)
    for res, have in (("GPU", gpus), ("CPU", cpus)):
        if res in need and need[res] > have + _EPS:
            fitting = int(math.floor(have / one[res] + _EPS)) if one[res] else ss.max_concurrent_trials
            hint = ""
            if res == "GPU":
                share = math.floor(have / (ss.max_concurrent_trials * slots_per_trial(ss)) * 1e4) / 1e4
                if share > 0:
                    hint = f", or trial.gpus_per_worker: {share:g} (--gpus-per-worker {share:g}) to share the GPUs"
            raise _error(ss, "trial.max_concurrent_trials",
                         f"{ss.max_concurrent_trials} concurrent trials × {one[res]:g} {res} = {need[res]:g} {res}s, "
                         f"{where} has {have:g}: the extra trials would wait for resources that never come. "
                         f"Use trial.max_concurrent_trials: {max(1, fitting)} (--max-concurrent-trials){hint}")


def parse_hardware(ss: "SearchSpace", raw: Any) -> dict[str, Any] | None:
    """The `hardware:` section: what the file is sized for."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise _error(ss, "hardware", "must be a mapping, e.g. {cpus: 8, gpus: 1}")
    extra = sorted(set(raw) - HARDWARE_KEYS)
    if extra:
        raise _error(ss, f"hardware.{extra[0]}", f"unknown key; allowed keys here: {sorted(HARDWARE_KEYS)}")
    out: dict[str, Any] = {}
    for key, whole in (("cpus", False), ("gpus", True), ("nodes", True)):
        if key not in raw:
            continue
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (whole and v != int(v)):
            raise _error(ss, f"hardware.{key}", f"must be a {'whole ' if whole else ''}number >= 0, got {v!r}")
        out[key] = int(v) if whole else float(v)
    if "cpus" not in out:
        raise _error(ss, "hardware.cpus", "say how many CPUs the file is sized for")
    out.setdefault("gpus", 0)
    out.setdefault("nodes", 1)
    if out["nodes"] < 1:
        raise _error(ss, "hardware.nodes", "must be >= 1")
    if "note" in raw:
        out["note"] = str(raw["note"])
    return out


def check_declared_hardware(ss: "SearchSpace") -> None:
    """A search-space file fits the hardware it names (checked when the file is loaded)."""
    hw = ss.hardware
    if not hw:
        return
    nodes = hw.get("nodes", 1)
    where = f"the declared hardware ({hw['cpus']:g} CPUs, {hw['gpus']} GPUs" + (f", {nodes} nodes)" if nodes > 1 else ")")
    check_fit(ss, hw["cpus"], hw["gpus"], where, nodes)


def local_resources() -> dict[str, float]:
    """What a local Ray started by tune.py will offer: this machine's CPUs and CUDA GPUs."""
    return {"CPU": float(local_cpu_count()), "GPU": float(local_gpu_count())}


def check_hardware(ss: "SearchSpace", resources: dict[str, float] | None = None, where: str | None = None) -> None:
    """The resolved search against real resources: this machine before a local Ray starts
    (`resources` None), or `ray.cluster_resources()` of the cluster it runs on."""
    if resources is None:
        if ss.use_gpu and not test_gpu_stand_in():
            try:
                device_for(True, "--use-gpu / trial.use_gpu")  # a clear error when CUDA is missing
            except DeviceError as err:
                raise _error(ss, "trial.use_gpu", str(err)) from err
        resources, where = local_resources(), where or "this machine"
    check_fit(ss, float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0)), where or "the Ray cluster")


def check_search_hardware(ss: "SearchSpace", address: str | None = None) -> None:
    """Before anything is written or charged: the search fits this machine (a local Ray that
    tune.py will start) or the cluster it attaches to (connected here, as the search would)."""
    import os

    import ray

    from ..ray_train import cluster_capacity, ensure_ray

    if ray.is_initialized():
        check_hardware(ss, *cluster_capacity())
    elif address or os.environ.get("RAY_ADDRESS"):
        ensure_ray(address)
        check_hardware(ss, *cluster_capacity())
    else:
        check_hardware(ss)


# --- what a trial holds -----------------------------------------------------------------------
def trial_resources(ss: "SearchSpace") -> dict[str, float]:
    """Resources of one Tune trial: a `trial_slot` when its Train workers hold the hardware,
    else the worker share it trains with (its GPU fraction included: never a silent CPU trial)."""
    if ss.num_workers > 0:
        return {"CPU": 0, "trial_slot": 1}
    res = {"CPU": ss.cpus_per_worker}
    if ss.use_gpu:
        res["GPU"] = ss.gpus_per_worker
    return res


def trial_worker_share(ss: "SearchSpace") -> dict[str, float]:
    """What each Ray Train worker of a trial holds (`fit_with_ray_train`'s keyword arguments):
    its CPUs and its fraction of a GPU, never a whole GPU where the search asks for less."""
    return {"cpus_per_worker": ss.cpus_per_worker, "gpus_per_worker": ss.gpus_per_worker}


def scoring_task_resources(ss: "SearchSpace") -> dict[str, float]:
    """The Ray task that synthesises and fits a Train trial's scoring classifier: one worker's share."""
    return {"num_cpus": ss.cpus_per_worker, "num_gpus": ss.gpus_per_worker if ss.use_gpu else 0}


def trial_device(ss: "SearchSpace") -> str:
    """The device of an in-process trial (raises when use_gpu and no CUDA GPU is visible)."""
    return device_for(ss.use_gpu, "trial.use_gpu")


def trial_seconds_per_iteration(ss: "SearchSpace", cfg: Any, shape: tuple[int, int, int], num_classes: int,
                                n_train: float, in_trial: bool) -> float:
    """The speed probe of a time budget, on the device the trial trains on (a CPU probe would plan
    a GPU trial far too few iterations). An in-process trial probes on the GPU share it holds; a Ray
    Train trial, and the search's plan (`in_trial` False) once Ray runs, in a Ray task that holds one
    worker's share; before Ray starts, the driver's own GPU (`check_hardware` has required one)."""
    from ..training import probe

    if not ss.use_gpu:
        return probe.seconds_per_iteration(cfg, shape, num_classes, n_train, "cpu")
    if in_trial and ss.num_workers == 0:
        return probe.seconds_per_iteration(cfg, shape, num_classes, n_train, trial_device(ss))
    import ray

    if not ray.is_initialized():
        return probe.seconds_per_iteration(cfg, shape, num_classes, n_train, trial_device(ss))
    opts: dict[str, Any] = {**scoring_task_resources(ss), "max_retries": 0, "scheduling_strategy": "DEFAULT"}
    if forwarded_env():
        opts["runtime_env"] = {"env_vars": forwarded_env()}
    task = ray.remote(_probe_task).options(**opts)
    return float(ray.get(task.remote(cfg, shape, num_classes, n_train, max(1, int(ss.cpus_per_worker)))))


def _probe_task(cfg, shape, num_classes, n_train, threads):
    import torch

    from ..training import probe

    torch.set_num_threads(threads)
    return probe.seconds_per_iteration(cfg, shape, num_classes, n_train, device_for(True, "trial.use_gpu"))


def synthesise_and_fit(generator: "ConditionalGenerator", ss: "SearchSpace", seed: int = 0
                       ) -> tuple["ImageDataset", Any]:
    """The trial's synthetic set and its scoring classifier, trained on `synthetic`, on the
    training device: the trial's own (in-process), or one worker's share in a Ray task."""
    if ss.num_workers == 0:
        return _synthesise_and_fit(generator, ss.num_synthetic, ss.classifier_epochs, ss.classifier_max_steps,
                                   seed, trial_device(ss))
    import ray

    # "DEFAULT": outside the trial's placement group (a bundle of one `trial_slot`), in the share
    # that the trial's Train workers have just given back.
    opts: dict[str, Any] = {**scoring_task_resources(ss), "max_retries": 0, "scheduling_strategy": "DEFAULT"}
    if forwarded_env():
        opts["runtime_env"] = {"env_vars": forwarded_env()}
    task = ray.remote(_synthesise_and_fit_task).options(**opts)
    threads = max(1, int(ss.cpus_per_worker))
    return ray.get(task.remote(generator.cpu(), ss.num_synthetic, ss.classifier_epochs, ss.classifier_max_steps,
                               seed, ss.use_gpu, threads))


def _synthesise_and_fit_task(generator, num_synthetic, epochs, max_steps, seed, use_gpu, threads):
    import torch

    torch.set_num_threads(threads)
    synthetic, model = _synthesise_and_fit(generator, num_synthetic, epochs, max_steps, seed,
                                           device_for(use_gpu, "trial.use_gpu"))
    return synthetic, model.cpu()


def _synthesise_and_fit(generator, num_synthetic, epochs, max_steps, seed, device):
    from ..models.scoring_cnn import train_classifier
    from ..release import generate

    generator = generator.to(device).eval()
    synthetic = generate(generator, num_synthetic)
    model = train_classifier(synthetic, epochs=epochs, max_steps=max_steps, seed=seed, device=device)
    return synthetic, model
