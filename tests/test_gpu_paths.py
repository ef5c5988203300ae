"""GPU paths on a machine without a GPU (issue #17), through stand-ins that fail where CUDA would:

- PyTorch's `meta` device for CUDA: it refuses to mix devices exactly as CUDA does ("Tensor on device
  cpu is not on the expected device meta!"), so training, checkpoints and the release written on it
  show every tensor that would reach the GPU from the wrong side. `MetaAsGPU` lets `.item()` and
  device-to-host copies through (as zeros): values are not the point, devices are.
- a process group whose only backend is registered for the training device ("meta:fake"): an
  all-reduce of a CPU tensor fails with NCCL's "No backend type associated with device type cpu".
- a Ray cluster that declares a GPU (`ray.init(num_gpus=1)`) while `DPAF_TEST_GPU_AS=cpu` lets the
  code compute on the CPU where Ray scheduled a GPU: fractional workers, concurrent trials.
"""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from device_spy import MetaAsGPU
from dpaf_ray.config import ConfigError, TrainConfig
from dpaf_ray.devices import TEST_GPU_ENV, DeviceError, gpu_device
from dpaf_ray.ray_resources import check_gpu_fraction, torch_backend
from dpaf_ray.collectives import LocalCollective, TorchDistributedCollective, all_reduce_many
from dpaf_ray.privacy.randomness import RunSecret
from dpaf_ray.training.checkpoint import LocalCheckpointSink
from dpaf_ray.training.draw_ahead import DRAW_AHEAD_ENV
from dpaf_ray.training.loop import make_trainer, train_loop
from dpaf_ray.release import write_artefacts
from dpaf_ray.tuning.search_space import load_search_space, validate_search_space
from dpaf_ray.tuning.search_space_error import SearchSpaceError

ROOT = Path(__file__).resolve().parents[1]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))
TINY = ROOT / "search_spaces" / "tiny.yaml"


def small_config(model: str = "dpaf", **kw) -> TrainConfig:
    base = dict(model=model, epsilon=10, iterations=3, seed=0, batch_size=64, group_size=32, feature_channels=8,
                checkpoint_every=2, log_every=1, num_threads=1, sgd_every=1, reproducible_noise=True,
                time_budget_minutes=30)
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def prepared():
    from dpaf_ray.run import prepare

    out = {}
    for model in ("dpaf", "dpsgd-gan"):
        cfg, data, plan, secret = prepare(small_config(model))
        out[model] = (plan, data, secret)
    return out


# ------------------------------------------------------------------ findings 1 and 2 on `meta`


@pytest.fixture
def meta_only_group():
    """A process group whose only backend serves `meta` tensors (as NCCL serves only CUDA)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    groups = []

    def make(rank: int, world: int = 2):
        if dist.is_initialized():
            dist.destroy_process_group()
        dist.init_process_group(backend="meta:fake", rank=rank, world_size=world, store=FakeStore())
        groups.append(rank)
        return TorchDistributedCollective()

    yield make
    if dist.is_initialized():
        dist.destroy_process_group()


def test_the_stand_in_group_refuses_cpu_tensors_like_nccl(meta_only_group):
    """What finding 1 hit: the old time-budget flag, a CPU tensor, through an NCCL-only group."""
    collective = meta_only_group(0)
    with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
        all_reduce_many(collective, [torch.tensor([1.0])])
    assert all_reduce_many(collective, [torch.ones(2, device="meta")])[0].device.type == "meta"


@pytest.mark.parametrize("model", ["dpaf", "dpsgd-gan"])
@pytest.mark.parametrize("rank", [0, 1])
def test_every_collective_of_a_run_gets_device_tensors(prepared, meta_only_group, monkeypatch, model, rank):
    """W = 2 through a meta-only group: the time-budget flag, every DPAGG and DP-SGD release,
    generated-record gradients, replicated updates (G, and the rear from rank 0), drawn ahead."""
    monkeypatch.setenv(DRAW_AHEAD_ENV, "1")
    plan, data, secret = prepared[model]
    collective = meta_only_group(rank)
    with MetaAsGPU():
        res = train_loop(plan, data.train, len(data.train), 0, collective, None, None, "meta", secret=secret)
    assert res.iterations_done == plan.iterations
    assert res.trainer.draw_ahead.hits > 0  # draws made ahead were used on the device
    assert all(p.device.type == "meta" for m in res.trainer.modules().values() for p in m.parameters())


@pytest.mark.parametrize("model", ["dpaf", "dpsgd-gan"])
def test_in_process_gpu_run_writes_checkpoint_and_outputs(prepared, tmp_path, monkeypatch, model):
    """Finding 2: training on the device, then checkpoints, generator.pt, the synthetic set and
    the sample grid from a generator that stays on the device."""
    monkeypatch.setenv(DRAW_AHEAD_ENV, "1")
    plan, data, secret = prepared[model]
    with MetaAsGPU():
        res = train_loop(plan, data.train, len(data.train), 0, None, LocalCheckpointSink(tmp_path), None, "meta",
                         secret=secret)
        assert res.trainer.generator.device.type == "meta"
        synthetic = write_artefacts(tmp_path / "release", res.trainer.generator, 30)
    assert len(synthetic) == 30 and synthetic.images.device.type == "cpu"
    assert sorted(p.name for p in (tmp_path / "release").iterdir()) == ["generator.pt", "samples.png",
                                                                        "synthetic.parquet"]
    state = torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)
    g = state["trainer"]["modules"]["generator"]
    assert all(v.device.type == "cpu" for v in g.values())


def test_train_use_gpu_end_to_end_on_the_stand_in(tmp_path, monkeypatch):
    """`train --use-gpu` in-process: device resolution, training, release, metrics, curves."""
    from dpaf_ray.run import run_train

    monkeypatch.setenv(TEST_GPU_ENV, "meta")
    monkeypatch.setenv(DRAW_AHEAD_ENV, "1")
    with MetaAsGPU():
        metrics = run_train(small_config(iterations=2), tmp_path / "run", num_synthetic=20, use_gpu=True,
                            progress=None)
    assert metrics["iterations_executed"] == 2
    assert (tmp_path / "run" / "release" / "synthetic.parquet").is_file()


def test_use_gpu_without_a_gpu_is_refused_not_run_on_the_cpu(monkeypatch):
    monkeypatch.delenv(TEST_GPU_ENV, raising=False)
    if torch.cuda.is_available():  # pragma: no cover - a GPU machine
        pytest.skip("a GPU is visible")
    with pytest.raises(DeviceError, match="--use-gpu: no CUDA GPU"):
        gpu_device()


# ------------------------------------------------------------------ finding 4: draws made ahead


@pytest.mark.parametrize("model", ["dpaf", "dpsgd-gan"])
def test_draws_made_ahead_are_the_same_draws(model, monkeypatch):
    """The same parameters bit for bit with and without the background draws (k = 2, a G step
    every other iteration, so the plan changes from one iteration to the next)."""
    from dpaf_ray.data import load_dataset

    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(model=model, batch_size=64, group_size=32, feature_channels=8, seed=0, sgd_every=2,
                      d_steps_per_g=2).validate()

    def run(ahead: bool):
        tr = make_trainer(cfg, data, len(data), 0, LocalCollective(), "cpu", RunSecret.from_public_seed(5))
        tr.draw_ahead.enabled = ahead
        for t in range(6):
            tr.d_iteration(t)
            if tr.g_step_after(t):
                tr.g_step(t)
        tr.draw_ahead.close()
        return tr

    a, b = run(False), run(True)
    for k, m in a.modules().items():
        for p, q in zip(m.parameters(), b.modules()[k].parameters()):
            assert torch.equal(p, q), k
    assert b.draw_ahead.hits > b.draw_ahead.misses > 0


def test_reserved_stream_reads_the_same_bytes():
    s = RunSecret.from_public_seed(1)
    a, b = s.stream("poisson", 3), s.stream("poisson", 3)
    b.reserve(16 * 100)
    assert (a.bernoulli(100, 0.3) == b.bernoulli(100, 0.3)).all() and (a.uniform(100) == b.uniform(100)).all()
    assert (a.normal(7) == b.normal(7)).all()  # past the reserved part


def test_noise_is_drawn_ahead_only_by_rank_0():
    from dpaf_ray.data import load_dataset

    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(batch_size=64, group_size=32, feature_channels=8, seed=0).validate()

    class Rank1(LocalCollective):
        rank = 1

    tr = make_trainer(cfg, data, len(data), 0, Rank1(), "cpu", RunSecret.from_public_seed(5))
    tr.draw_ahead.noise_sizes.update({"dpagg/real": 10, "dpagg/fake": 10, "dpsgd/conv2": 10, "dpagg/g": 10})
    draws = tr.draw_ahead._compute(1, tr.draw_plan(1), dict(tr.draw_ahead.noise_sizes))
    assert draws.sample is not None and draws.codes and not draws.noise


# ------------------------------------------------------------------ finding 5: one rear for all ranks


class ThreadCollective:
    """W ranks as threads of one process; sums in rank order, so every rank gets the same bits."""

    def __init__(self, rank: int, shared: dict) -> None:
        self.rank, self.world_size, self.shared = rank, shared["world"], shared

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        sh = self.shared
        sh["buf"][self.rank] = tensor.detach().clone()
        sh["barrier"].wait()
        out = sh["buf"][0].clone()
        for t in sh["buf"][1:]:
            out = out + t
        sh["barrier"].wait()
        return out


def test_replicated_parts_stay_identical_when_a_rank_computes_a_different_rear_gradient():
    """A non-deterministic backward pass (simulated: rank 1 scales its rear gradient by 1.001)
    must not make the copies of the rear, and so of everything downstream, drift apart."""
    from dpaf_ray.data import load_dataset

    torch.set_num_threads(1)
    data = load_dataset("mnist-5k", "train")
    cfg = TrainConfig(batch_size=64, group_size=32, feature_channels=8, seed=0, sgd_every=1).validate()
    shared = {"world": 2, "buf": [None, None], "barrier": threading.Barrier(2, timeout=120)}
    half = len(data) // 2
    trainers = []
    for rank, idx in enumerate((torch.arange(half), torch.arange(half, len(data)))):
        tr = make_trainer(cfg, data.subset(idx), len(data), int(idx[0]), ThreadCollective(rank, shared), "cpu",
                          RunSecret.from_public_seed(2))
        trainers.append(tr)
    for p in trainers[1].rear.parameters():
        p.register_hook(lambda g: g * 1.001)
    errors = []

    def run(tr):
        try:
            for t in range(4):
                tr.d_iteration(t)
                tr.g_step(t)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
            shared["barrier"].abort()

    threads = [threading.Thread(target=run, args=(tr,)) for tr in trainers]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    a, b = trainers
    for k in ("rear", "generator", "private"):
        for p, q in zip(a.modules()[k].parameters(), b.modules()[k].parameters()):
            assert torch.equal(p, q), f"the {k} copies drifted apart"


# ------------------------------------------------------------------ backends, fractions, CLI


def test_backend_serves_cpu_and_device_tensors():
    assert torch_backend(False) == "gloo"
    assert torch_backend(True, 1.0) == "cpu:gloo,cuda:nccl"
    assert torch_backend(True, 2.0) == "cpu:gloo,cuda:nccl"
    assert torch_backend(True, 0.5) == "gloo"  # NCCL refuses two ranks on one GPU


@pytest.mark.parametrize("value,ok", [(0.25, True), (1, True), (2, True), (0.0, False), (1.5, False),
                                      (1 / 3, False), (-1, False)])
def test_gpu_fractions_ray_can_schedule(value, ok):
    if ok:
        assert check_gpu_fraction(value, "--gpus-per-worker") == value
    else:
        with pytest.raises(ConfigError, match="--gpus-per-worker"):
            check_gpu_fraction(value, "--gpus-per-worker")


def test_cli_flags(monkeypatch, capsys):
    from dpaf_ray.cli import build_parser, main
    from dpaf_ray.tuning.cli import build_parser as tune_parser

    monkeypatch.delenv(TEST_GPU_ENV, raising=False)
    args = build_parser().parse_args(["train", "--out", "x", "--num-workers", "2", "--use-gpu",
                                      "--gpus-per-worker", "0.5"])
    assert args.gpus_per_worker == 0.5
    assert build_parser().parse_args(["evaluate", "run", "--test-data", "mnist-5k", "--use-gpu"]).use_gpu
    t = tune_parser().parse_args(["--use-gpu", "--gpus-per-worker", "0.25", "--max-concurrent-trials", "4"])
    assert (t.use_gpu, t.gpus_per_worker, t.max_concurrent_trials) == (True, 0.25, 4)
    assert tune_parser().parse_args(["--no-use-gpu"]).use_gpu is False
    assert main(["train", "--out", "x", "--gpus-per-worker", "1.5", "--num-workers", "2", "--use-gpu"]) == 2
    assert "--gpus-per-worker" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["evaluate", "nowhere", "--test-data", "mnist-5k", "--use-gpu", "--out", "/tmp/x.json"]) == 2
        assert "no CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------ search spaces against hardware


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_search_space_declares_and_fits_its_hardware(path):
    from dpaf_ray.tuning.resources import search_needs

    ss = load_search_space(path)  # raises if the file does not fit what it declares
    hw = ss.hardware
    assert hw is not None, f"{path.name}: add a `hardware:` section"
    need = search_needs(ss)
    assert need["CPU"] <= hw["cpus"]
    assert ss.use_gpu == (hw["gpus"] > 0), f"{path.name}: a file sized for GPUs uses them, a CPU file does not"
    if ss.use_gpu:
        assert need["GPU"] <= hw["gpus"]
        assert ss.gpus_per_worker <= hw["gpus"] / hw["nodes"]


def _space(tmp_path, trial: dict, hardware: dict | None = None, name="s.yaml"):
    import yaml

    raw = yaml.safe_load(TINY.read_text())
    raw["trial"] = {**raw["trial"], **trial}
    if hardware is None:
        raw.pop("hardware", None)
    else:
        raw["hardware"] = hardware
    p = tmp_path / name
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("trial,hardware,key,hint", [
    # the old fashion-mnist.yaml: "one GPU node", 2 workers with a whole GPU each
    ({"num_workers": 2, "use_gpu": True}, {"cpus": 8, "gpus": 1}, "trial.num_workers", "gpus_per_worker"),
    ({"num_workers": 1, "use_gpu": True, "max_concurrent_trials": 4}, {"cpus": 8, "gpus": 1},
     "trial.max_concurrent_trials", "--gpus-per-worker 0.25"),
    ({"num_workers": 0, "max_concurrent_trials": 3}, {"cpus": 2, "gpus": 0}, "trial.max_concurrent_trials",
     "max_concurrent_trials: 2"),
    ({"use_gpu": True}, {"cpus": 2, "gpus": 0}, "trial.use_gpu", "has none"),
    ({"use_gpu": True, "gpus_per_worker": 2}, {"cpus": 8, "gpus": 2, "nodes": 2}, "trial.gpus_per_worker", "node"),
    ({"use_gpu": True, "gpus_per_worker": 0.3333}, None, None, None),
    ({"use_gpu": True, "gpus_per_worker": 1.5}, None, "trial.gpus_per_worker", "fraction"),
])
def test_a_space_that_overruns_its_hardware_is_refused_naming_the_key(tmp_path, trial, hardware, key, hint):
    path = _space(tmp_path, trial, hardware)
    if key is None:
        load_search_space(path)
        return
    with pytest.raises(SearchSpaceError) as err:
        load_search_space(path)
    assert f"`{key}`" in str(err.value) and hint in str(err.value), str(err.value)


def test_the_search_is_checked_against_the_machine_before_ray_starts(monkeypatch):
    import ray

    from dpaf_ray.tuning.resources import check_hardware, check_search_hardware

    monkeypatch.delenv(TEST_GPU_ENV, raising=False)
    ss = dataclasses.replace(load_search_space(TINY), hardware=None)
    if ray.is_initialized():  # pragma: no cover - another test left Ray running
        pytest.skip("Ray is running")
    check_search_hardware(ss)
    assert not ray.is_initialized()
    big = dataclasses.replace(ss, max_concurrent_trials=10_000)
    with pytest.raises(SearchSpaceError, match="trial.max_concurrent_trials"):
        check_search_hardware(big)
    gpu = validate_search_space(dataclasses.replace(ss, use_gpu=True, gpus_per_worker=0.25,
                                                    max_concurrent_trials=4, num_workers=0))
    if not torch.cuda.is_available():
        with pytest.raises(SearchSpaceError, match="trial.use_gpu.*no CUDA GPU"):
            check_search_hardware(gpu)
    check_hardware(gpu, {"CPU": 4, "GPU": 1}, "a 1-GPU test cluster")  # 4 × 0.25 on one GPU
    with pytest.raises(SearchSpaceError, match="max_concurrent_trials"):
        check_hardware(dataclasses.replace(gpu, max_concurrent_trials=5), {"CPU": 8, "GPU": 1}, "a 1-GPU cluster")


def test_trial_resources():
    from dpaf_ray.tuning.resources import trial_resources

    ss = load_search_space(TINY)
    assert trial_resources(dataclasses.replace(ss, num_workers=1, use_gpu=True)) == {"CPU": 0, "trial_slot": 1}
    inproc = dataclasses.replace(ss, num_workers=0, use_gpu=True, gpus_per_worker=0.25, cpus_per_worker=2)
    assert trial_resources(inproc) == {"CPU": 2, "GPU": 0.25}  # never a silent CPU trial
    assert trial_resources(dataclasses.replace(inproc, use_gpu=False)) == {"CPU": 2}


# ------------------------------------------------------------------ Ray with a declared GPU (slow)


@pytest.fixture
def fake_gpu_ray(monkeypatch):
    """A local Ray with 2 CPUs and 1 declared GPU; the code computes on the CPU where Ray gave a GPU."""
    import ray

    monkeypatch.setenv(TEST_GPU_ENV, "cpu")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=1, resources={"trial_slot": 2}, include_dashboard=False,
             _node_ip_address="127.0.0.1")
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_two_workers_share_one_gpu(fake_gpu_ray, prepared, tmp_path):
    from dpaf_ray.ray_train import ResourceError, fit_with_ray_train
    from dpaf_ray.data.splits import SPLIT_LABEL

    plan, data, secret = prepared["dpaf"]
    with pytest.raises(ResourceError, match="GPU: need 2, cluster has 1.*--gpus-per-worker"):
        fit_with_ray_train(plan, data, 2, use_gpu=True, out=tmp_path / "a", progress=None, secret=secret,
                           split_key=secret.child(SPLIT_LABEL))
    res = fit_with_ray_train(plan, data, 2, use_gpu=True, gpus_per_worker=0.5, out=tmp_path / "b", progress=None,
                             secret=secret, split_key=secret.child(SPLIT_LABEL))
    assert res.iterations_done == plan.iterations
    # `train --num-workers 2 --use-gpu` asking for a whole GPU each: refused before anything is written
    from dpaf_ray.config import ConfigError
    from dpaf_ray.run import run_train

    with pytest.raises(ConfigError, match="GPU: need 2"):  # a ResourceError: the CLI exits 2
        run_train(small_config(), tmp_path / "refused", num_workers=2, use_gpu=True, progress=None)
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("num_workers", [1, 0])
def test_tune_use_gpu_runs_concurrent_trials_on_one_gpu(fake_gpu_ray, tmp_path, num_workers):
    """`tune.py --use-gpu` on a 1-GPU cluster: 2 trials side by side, 0.5 GPU each (Train workers,
    or in-process trials holding the GPU share themselves); both finish and are released from."""
    from dpaf_ray.tuning.tuner import run_search

    ss = validate_search_space(dataclasses.replace(
        load_search_space(TINY), hardware=None, use_gpu=True, gpus_per_worker=0.5, max_concurrent_trials=2,
        num_workers=num_workers, cpus_per_worker=1, search="tpe", expected_trials=2))
    out = tmp_path / "run"
    t0 = time.time()
    release = run_search(ss, out, progress=lambda s: None)
    trials = [json.loads(p.read_text()) for p in sorted((out / "trials").glob("*/trial.json"))]
    assert len(trials) == 2, "a trial did not finish"
    assert (release / "generator.pt").is_file()
    # side by side: each trial started before the other one reported (Tune's own times)
    spans = []
    for path in sorted((out / "trials" / "ray_tune" / "search").glob("*/result.json")):
        r = json.loads(path.read_text().splitlines()[0])
        spans.append((r["timestamp"] - r["time_total_s"], r["timestamp"]))
    assert len(spans) == 2
    (s0, e0), (s1, e1) = spans
    assert s0 < e1 and s1 < e0, f"trials ran one after the other: {spans} ({time.time() - t0:.0f}s)"
