"""A GPU run that quietly computes part of its work on the CPU fails here (issue #36).

CUDA's stand-in is `meta` (`DPAF_TEST_GPU_AS=meta`), watched by `device_spy.DeviceSpy`, which
records the device of every convolution and matrix product. A CPU stand-in cannot tell a CPU
fallback from the GPU path; the spy can: a part that falls back still runs, but on `cpu`.
Also the pieces of the GPU path that only a GPU machine or a slow Ray test would otherwise see:
the workers' GPU share, draw-ahead's default on CUDA, and the process-group backend string.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from device_spy import DeviceSpy
from dpaf_ray.config import TrainConfig
from dpaf_ray.devices import TEST_GPU_ENV

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "search_spaces" / "tiny.yaml"


def classifier_phase_config(**kw) -> TrainConfig:
    base = dict(model="dpaf", epsilon=10, iterations=3, seed=0, batch_size=64, group_size=32, feature_channels=8,
                checkpoint_every=100, log_every=1, num_threads=1, sgd_every=1, reproducible_noise=True,
                classifier_steps=2, classifier_batch=64)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained_on_meta():
    """A DPAF run with a label-classifier phase, trained on the stand-in GPU (and its spy)."""
    from dpaf_ray.run import prepare
    from dpaf_ray.training.loop import train_loop

    cfg, data, plan, secret = prepare(classifier_phase_config())
    assert plan.schedule.prefix_iterations == 2  # the phase whose classifier labels the release
    spy = DeviceSpy()
    with spy:
        res = train_loop(plan, data.train, len(data.train), 0, None, None, None, "meta", secret=secret)
    return res, spy


def test_training_with_a_classifier_phase_runs_on_the_device(trained_on_meta):
    res, spy = trained_on_meta
    assert spy.count("meta") > 0 and spy.cpu_ops == {}, spy.cpu_ops
    assert res.trainer.teacher is not None
    assert all(p.device.type == "meta" for p in res.trainer.teacher.model.parameters())


def test_the_release_labeller_runs_on_the_device(trained_on_meta, tmp_path):
    """The synthetic set of a run with a classifier phase: G and its labeller both on the device."""
    from dpaf_ray.release import write_artefacts

    res, _ = trained_on_meta
    spy = DeviceSpy()
    with spy:
        generator = res.trainer.released_generator()
        assert generator.labeller is not None
        synthetic = write_artefacts(tmp_path / "release", generator, 30)
    assert len(synthetic) == 30
    assert all(p.device.type == "meta" for p in generator.labeller.parameters())
    labeller_linear = sum(n for (op, d), n in spy.ops.items() if op == "addmm" and d == "meta")
    assert labeller_linear > 0, spy.ops  # the labeller's heads ran on the device …
    assert spy.cpu_ops == {}, f"part of the release was computed on the CPU: {spy.cpu_ops}"  # … and nothing on the CPU


def _gpu_trial_space(**kw):
    from dpaf_ray.tuning.search_space import load_search_space, validate_search_space

    fields = dict(hardware=None, use_gpu=True, gpus_per_worker=0.25, max_concurrent_trials=4, num_workers=0,
                  cpus_per_worker=1, num_synthetic=60, classifier_max_steps=2)
    return validate_search_space(dataclasses.replace(load_search_space(TINY), **{**fields, **kw}))


def test_trial_scoring_runs_on_the_trial_device(trained_on_meta, monkeypatch):
    """An in-process GPU trial: its synthetic set, its scoring classifier's training and the count
    of correct predictions on the validation set all run on the trial's device."""
    from dpaf_ray.data import load_dataset
    from dpaf_ray.privacy.ledger import PrivacyLedger
    from dpaf_ray.tuning.resources import synthesise_and_fit
    from dpaf_ray.tuning.scoring import score_trial

    monkeypatch.setenv(TEST_GPU_ENV, "meta")
    res, _ = trained_on_meta
    ss = _gpu_trial_space()
    validation = load_dataset("mnist-5k", "test").subset(torch.arange(50))
    spy = DeviceSpy()
    with spy:
        synthetic, classifier = synthesise_and_fit(res.trainer.released_generator().eval(), ss, 0)
        trained = spy.count("meta")
        score = score_trial(synthetic, validation, PrivacyLedger(60_000, 1e-5), None, 1, 2, model=classifier)
    assert len(synthetic) == 60 and 0 <= score.value <= 1
    assert trained > 0 and spy.count("meta") > trained, spy.ops  # the scoring model trained and predicted there
    assert spy.cpu_ops == {}, f"the trial scored on the CPU: {spy.cpu_ops}"


def test_evaluate_use_gpu_runs_on_the_device(trained_on_meta, tmp_path, monkeypatch, capsys):
    """`evaluate RUN --use-gpu`: generation, the downstream classifiers and the FID features on the device."""
    import json

    from dpaf_ray.cli import main
    from dpaf_ray.release import write_artefacts

    monkeypatch.setenv(TEST_GPU_ENV, "meta")
    res, _ = trained_on_meta
    run = tmp_path / "run"
    spy = DeviceSpy()
    with spy:
        write_artefacts(run / "release", res.trainer.released_generator(), 20)
        spy.reset()
        rc = main(["evaluate", str(run), "--test-data", "mnist-5k", "--use-gpu", "--num-synthetic", "100",
                   "--epochs", "1", "--max-train-records", "100", "--out", str(tmp_path / "eval.json")])
    assert rc in (0, None), capsys.readouterr().err
    assert json.loads((tmp_path / "eval.json").read_text())["num_synthetic"] == 100
    assert spy.count("meta") > 0, spy.ops
    assert spy.cpu_ops == {}, f"evaluate --use-gpu computed on the CPU: {spy.cpu_ops}"


# ------------------------------------------------------------------ shares, defaults, backends


def test_trial_workers_hold_their_fraction_of_a_gpu():
    """Each Train worker of a GPU trial, and its scoring task, holds `gpus_per_worker` of a GPU,
    never a whole one: 4 trials × 0.25 fit one GPU."""
    from dpaf_ray.ray_train import worker_resources
    from dpaf_ray.tuning.resources import check_hardware, scoring_task_resources, trial_resources, trial_worker_share

    ss = _gpu_trial_space(num_workers=1)
    share = trial_worker_share(ss)
    assert share == {"cpus_per_worker": 1, "gpus_per_worker": 0.25}
    assert worker_resources(ss.use_gpu, **share) == {"GPU": 0.25, "CPU": 1}
    assert trial_resources(ss) == {"CPU": 0, "trial_slot": 1}  # the trial itself holds no GPU
    assert scoring_task_resources(ss) == {"num_cpus": 1, "num_gpus": 0.25}
    check_hardware(ss, {"CPU": 4, "GPU": 1}, "a 1-GPU cluster")
    inproc = _gpu_trial_space(num_workers=0)
    assert trial_resources(inproc) == {"CPU": 1, "GPU": 0.25}
    cpu = dataclasses.replace(ss, use_gpu=False)
    assert worker_resources(cpu.use_gpu, **trial_worker_share(cpu)) == {"CPU": 1}
    assert scoring_task_resources(cpu) == {"num_cpus": 1, "num_gpus": 0}


def test_draw_ahead_is_on_by_default_on_cuda(monkeypatch):
    from dpaf_ray.training.draw_ahead import DRAW_AHEAD_ENV, default_enabled

    monkeypatch.delenv(DRAW_AHEAD_ENV, raising=False)
    assert default_enabled(torch.device("cuda"))
    assert default_enabled(torch.device("cuda", 1))
    assert not default_enabled(torch.device("cpu"))
    monkeypatch.setenv(DRAW_AHEAD_ENV, "0")
    assert not default_enabled(torch.device("cuda"))


def test_a_trainer_on_cuda_draws_ahead(monkeypatch):
    """The trainer asks `default_enabled` with its own device (a trainer is built on `meta`
    here, with `meta` taking CUDA's place in the default)."""
    from dpaf_ray.data import load_dataset
    from dpaf_ray.privacy.randomness import RunSecret
    from dpaf_ray.training import draw_ahead
    from dpaf_ray.training.loop import make_trainer

    monkeypatch.delenv(draw_ahead.DRAW_AHEAD_ENV, raising=False)
    real = draw_ahead.default_enabled
    monkeypatch.setattr("dpaf_ray.training.gan.default_enabled",
                        lambda d: real(torch.device("cuda") if torch.device(d).type == "meta" else d))
    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(batch_size=64, group_size=32, feature_channels=8, seed=0).validate()
    with DeviceSpy():
        on_gpu = make_trainer(cfg, data, len(data), 0, None, "meta", RunSecret.from_public_seed(1))
    on_cpu = make_trainer(cfg, data, len(data), 0, None, "cpu", RunSecret.from_public_seed(1))
    try:
        assert on_gpu.draw_ahead.enabled and not on_cpu.draw_ahead.enabled
    finally:
        on_gpu.draw_ahead.close()
        on_cpu.draw_ahead.close()


def test_ray_and_torch_accept_the_mixed_backend_string():
    """`cpu:gloo,cuda:nccl` (one GPU per worker): Ray Train passes it to `init_process_group` as is,
    treats it as NCCL (its NCCL error-handling environment), and torch maps each device to its backend."""
    from ray.train.torch import TorchConfig
    from ray.train.torch.config import _is_backend_nccl
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    from dpaf_ray.ray_resources import torch_backend

    mixed = "cpu:gloo,cuda:nccl"
    assert TorchConfig(backend=mixed).backend == mixed
    assert _is_backend_nccl(mixed) and not _is_backend_nccl("gloo")
    assert BackendConfig(Backend(mixed)).get_device_backend_map() == {"cpu": "gloo", "cuda": "nccl"}
    import os
    saved = os.environ.pop(TEST_GPU_ENV, None)
    try:
        assert torch_backend(True, 1.0) == mixed
        assert torch_backend(True, 0.5) == "gloo" and torch_backend(False) == "gloo"
    finally:
        if saved is not None:
            os.environ[TEST_GPU_ENV] = saved


# ------------------------------------------------------------------ the driver's and the search's devices


def test_the_search_probes_speed_on_the_trial_device(monkeypatch):
    """A GPU search with a time budget and no `trial.iterations`: the search's plan and the trial
    time an iteration on the GPU they train on, never on the CPU (which would plan far too few)."""
    from dpaf_ray.training import probe
    from dpaf_ray.tuning.resources import trial_seconds_per_iteration
    from dpaf_ray.tuning.reference import plan_search

    monkeypatch.setenv(TEST_GPU_ENV, "meta")
    devices = []
    monkeypatch.setattr(probe, "seconds_per_iteration",
                        lambda cfg, shape, k, n, device="cpu", **kw: devices.append(str(device)) or 0.05)
    for workers in (0, 1):
        ss = _gpu_trial_space(num_workers=workers, trial_iterations=None, time_budget_minutes=2)
        cfg = classifier_phase_config(iterations=None, time_budget_minutes=2)
        for in_trial in (True, False):
            assert trial_seconds_per_iteration(ss, cfg, (1, 28, 28), 10, 5000, in_trial) == 0.05
        state = plan_search(ss, 5000, (1, 28, 28), 10)
        assert state["reference_plan"]["iterations"] > 0
    assert devices and set(devices) == {"meta"}, devices
    cpu = dataclasses.replace(_gpu_trial_space(trial_iterations=None, time_budget_minutes=2), use_gpu=False)
    devices.clear()
    trial_seconds_per_iteration(cpu, classifier_phase_config(), (1, 28, 28), 10, 5000, True)
    assert devices == ["cpu"]


def test_a_multi_worker_release_is_generated_on_the_drivers_gpu(tmp_path, monkeypatch):
    """`train --num-workers W --use-gpu`: the driver writes the release (a classifier phase's
    labeller included) on its own GPU when it has one."""
    from dpaf_ray import run as run_module
    from dpaf_ray.run import prepare, probe_device
    from dpaf_ray.training.loop import train_loop

    monkeypatch.setenv(TEST_GPU_ENV, "meta")
    assert probe_device(True, 2) == "meta" and probe_device(False, 2) == "cpu"
    cfg, data, plan, secret = prepare(classifier_phase_config())
    res = train_loop(plan, data.train, len(data.train), 0, None, None, None, "cpu", secret=secret)  # as from Ray
    monkeypatch.setattr(run_module, "train_private", lambda *a, **k: (res, data))  # the W workers' result
    spy = DeviceSpy()
    with spy:
        metrics = run_module.run_train(cfg, tmp_path / "run", num_synthetic=30, num_workers=2, use_gpu=True,
                                       progress=None)
    assert (tmp_path / "run" / "release" / "synthetic.parquet").is_file() and "epsilon" in metrics
    assert spy.count("meta") > 0 and spy.cpu_ops == {}, spy.ops


@pytest.mark.parametrize("model", ["dpaf", "dpsgd-gan"])
def test_an_iteration_reads_nothing_back_from_the_device(model, monkeypatch):
    """Host syncs (issue #36): once running, a training iteration (D and G steps) keeps its losses
    and constant checks on the device; the host never waits for a value from it."""
    from dpaf_ray.data import load_dataset
    from dpaf_ray.privacy.randomness import RunSecret
    from dpaf_ray.training.draw_ahead import DRAW_AHEAD_ENV
    from dpaf_ray.training.loop import make_trainer

    monkeypatch.setenv(DRAW_AHEAD_ENV, "1")
    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(model=model, batch_size=64, group_size=32, feature_channels=8, seed=0, sgd_every=1,
                      classifier_steps=0).validate()
    spy = DeviceSpy()
    with spy:
        tr = make_trainer(cfg, data, len(data), 0, None, "meta", RunSecret.from_public_seed(1))
        try:
            for t in range(4):
                if t == 2:
                    spy.reset()
                tr.d_iteration(t)
                if tr.g_step_after(t):
                    tr.g_step(t)
        finally:
            tr.draw_ahead.close()
    assert spy.count("meta") > 0
    assert spy.device_reads == 0, f"{spy.device_reads} values read back from the device in 2 iterations"
