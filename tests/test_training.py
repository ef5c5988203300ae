"""Training runs: every supported resolution, reproducibility, time budget, and an end-to-end run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dpaf_ray.config import ConfigError, TrainConfig
from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.models.architecture import SUPPORTED_SHAPES
from dpaf_ray.models.discriminator import PIXEL_RFF_FEATURES
from dpaf_ray.training.loop import make_trainer, train_loop
from dpaf_ray.training.plan import plan_training
from dpaf_ray.collectives import LocalCollective

REPO = Path(__file__).resolve().parents[1]


def random_images(shape, n=64, classes=3, seed=0) -> ImageDataset:
    g = torch.Generator().manual_seed(seed)
    return ImageDataset(torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8),
                        torch.randint(0, classes, (n,), generator=g), classes, "random")


@pytest.mark.parametrize("model", ["dpaf", "dpsgd-gan"])
@pytest.mark.parametrize("shape", SUPPORTED_SHAPES)
def test_every_resolution_trains_one_iteration(shape, model):
    torch.set_num_threads(1)
    ds = random_images(shape, n=32)
    cfg = TrainConfig(model=model, batch_size=16, group_size=8, seed=0, feature_channels=4).validate(len(ds))
    tr = make_trainer(cfg, ds, len(ds), 0, LocalCollective(), "cpu")
    before = [p.detach().clone() for p in tr.generator.parameters()]
    tr.d_iteration(0)
    tr.g_step(0)
    x = tr.sample_images(torch.arange(3))
    assert x.shape == (3, *shape)
    assert x.min() >= -1 and x.max() <= 1
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.generator.parameters()))


def _params(result) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for m in result.trainer.modules().values() for p in m.parameters()])


def test_same_seed_same_run_other_seed_other_run():
    """Bit-for-bit repeats need --reproducible-noise (noise from the public seed); by default the
    noise comes from a fresh secret, so the same public seed gives another run (tests/test_privacy_threats.py)."""
    ds = random_images((1, 28, 28), n=200)
    runs = []
    for seed in (5, 5, 6):
        cfg = TrainConfig(batch_size=32, group_size=16, seed=seed, iterations=6, log_every=3, checkpoint_every=3,
                          num_threads=1, epsilon=50, reproducible_noise=True)
        runs.append(train_loop(plan_training(cfg, len(ds)), ds, len(ds), progress=None))
    assert torch.equal(_params(runs[0]), _params(runs[1]))
    assert not torch.equal(_params(runs[0]), _params(runs[2]))
    assert runs[0].ledger.entries == runs[1].ledger.entries


def test_time_budget_stops_at_a_boundary_with_an_exact_ledger(monkeypatch):
    ds = random_images((1, 28, 28), n=200)
    cfg = TrainConfig(batch_size=32, group_size=16, seed=1, iterations=40, checkpoint_every=5, log_every=5,
                      num_threads=1, epsilon=50, time_budget_minutes=1e-9)
    res = train_loop(plan_training(cfg, len(ds)), ds, len(ds), progress=None)
    assert res.stopped_early and res.iterations_done < 40
    assert res.iterations_done % 5 == 0
    charged = sum(e.count for e in res.ledger.entries)
    assert charged == res.iterations_done  # stopped before charging the next window


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_pixel_statistics_and_the_generator_objective_cost_no_privacy(shape):
    ds = random_images(shape, n=48)
    common = dict(batch_size=16, group_size=8, seed=0, feature_channels=4, iterations=2, epsilon=50,
                  num_threads=1, log_every=1, checkpoint_every=2)
    plain = train_loop(plan_training(TrainConfig(**common, pixel_statistics=False), len(ds)), ds, len(ds),
                       progress=None)
    cfg = TrainConfig(**common, pixel_statistics=True, pixel_matching=5.0)
    res = train_loop(plan_training(cfg, len(ds)), ds, len(ds), progress=None)
    arch = res.trainer.arch
    assert res.trainer.embed.dim == 2 * 4 * arch.pooled ** 2 + 2 * shape[0] * arch.pixel_pooled ** 2 + PIXEL_RFF_FEATURES
    # G's objective and the public pixel map are post-processing: the ledger is unchanged
    assert res.ledger.entries == plain.ledger.entries
    assert not torch.equal(_params(res), _params(plain))


def test_pixel_statistics_tell_speckle_from_a_smooth_image_with_the_same_local_means():
    from dpaf_ray.models.discriminator import pixel_statistics

    smooth = torch.zeros(1, 1, 28, 28)  # mid-grey everywhere: u = 0.5
    g = torch.Generator().manual_seed(0)
    speckle = (torch.rand(1, 1, 28, 28, generator=g) < 0.5).float() * 2 - 1  # u ∈ {0, 1}, mean ≈ 0.5
    (a_mean, a_sq), (b_mean, b_sq) = pixel_statistics(smooth, 4).chunk(2, 1), pixel_statistics(speckle, 4).chunk(2, 1)
    assert torch.allclose(a_mean, b_mean, atol=0.12)  # local means alike
    assert (b_sq - a_sq).min() > 0.12  # local energy: speckle ≈ 0.5, smooth 0.25


def test_pixel_rff_inner_products_approximate_a_gaussian_kernel():
    from dpaf_ray.models.discriminator import pixel_statistics

    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 1, 28, 28, generator=g) * 2 - 1
    x[3:] = (x[:3] + 0.3 * torch.randn(3, 1, 28, 28, generator=g)).clamp(-1, 1)  # some close pairs
    f = pixel_statistics(x, 14, ("rff",))
    u = ((x + 1) / 2).flatten(1)
    ell = 0.3 * 28
    kernel = torch.exp(-torch.cdist(u, u).pow(2) / (2 * ell ** 2))
    approx = f @ f.t() / (0.25 * PIXEL_RFF_FEATURES / 2)
    assert torch.allclose(approx, kernel, atol=0.15)
    assert kernel.min() < 0.6  # the check is not trivial


def test_smooth_output_cannot_draw_a_pixel_checkerboard(tmp_path):
    """The binomial low-pass has zero gain at the highest spatial frequency."""
    from dpaf_ray.models.architecture import architecture_for
    from dpaf_ray.models.generator import ConditionalGenerator
    from dpaf_ray.models.generator import load_generator

    arch = architecture_for((1, 28, 28))
    i = torch.arange(28)
    checker = ((i[:, None] + i[None, :]) % 2 * 2 - 1).float().view(1, 1, 28, 28)
    outs = {}
    for smooth in (False, True):
        g = ConditionalGenerator(arch, 3, smooth_output=smooth)
        g.to_image.forward = lambda h: 3 * checker.expand(len(h), 1, 28, 28)
        outs[smooth] = g(torch.randn(2, g.z_dim), torch.tensor([0, 1])).detach()
    assert outs[False].abs().min() > 0.99
    assert outs[True][..., 1:-1, 1:-1].abs().max() < 1e-6
    g = ConditionalGenerator(arch, 3, smooth_output=True)
    g.save(tmp_path / "g.pt")
    loaded = load_generator(tmp_path / "g.pt")
    z, y = torch.randn(4, g.z_dim), torch.tensor([0, 1, 2, 0])
    assert loaded.smooth_output and torch.allclose(loaded(z, y), g.eval()(z, y))


def test_a_configuration_or_generator_written_before_options_were_removed_loads_only_at_their_defaults(tmp_path):
    """Checkpoints and trial plans hold the whole TrainConfig of their time: a removed option at the value
    every run had resumes, any other value is refused by name; so is a generator.pt that used one."""
    from dpaf_ray.config import RETIRED
    from dpaf_ray.models.architecture import architecture_for
    from dpaf_ray.models.generator import ConditionalGenerator, load_generator

    old = {**TrainConfig(seed=1).to_dict(), **RETIRED}
    assert TrainConfig.from_dict(old) == TrainConfig(seed=1)
    name = sorted(RETIRED)[0]
    with pytest.raises(ConfigError, match=name):
        TrainConfig.from_dict({**old, name: "changed"})
    with pytest.raises(ConfigError, match="unknown option"):
        TrainConfig.from_dict({**old, "no_such_option": 1})
    g = ConditionalGenerator(architecture_for((1, 28, 28)), 3)
    blob = {"state_dict": g.state_dict(), "shape": [1, 28, 28], "num_classes": 3, "z_dim": g.z_dim,
            "upsample": "bilinear"}
    torch.save(blob, tmp_path / "g.pt")
    with pytest.raises(ValueError, match="no longer has"):
        load_generator(tmp_path / "g.pt")
    torch.save({**blob, "upsample": "nearest", "width": 64}, tmp_path / "g.pt")
    z, y = torch.zeros(1, g.z_dim), torch.tensor([1])
    assert torch.equal(load_generator(tmp_path / "g.pt")(z, y), g.eval()(z, y))


@pytest.mark.slow
def test_end_to_end_train_and_evaluate_on_mnist_5k(tmp_path):
    """The whole budget on the embedded data (T derived from ε), then the evaluation command."""
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, "-m", "dpaf_ray", "train", "--epsilon", "10", "--delta", "1e-5",
                        "--seed", "0", "--out", str(out), "--num-synthetic", "2000", "--num-threads", "2"],
                       cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ε executed" in r.stdout and "left" in r.stdout
    for name in ("release/generator.pt", "release/synthetic.parquet", "release/samples.png", "curves.png",
                 "metrics.json", "release/privacy_report.json", "release/score.json", "ledger.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "release" / "privacy_report.json").read_text())
    assert 0 < report["epsilon"] <= report["target_epsilon"] == 10
    assert report["epsilon"] >= 0.95 * 10  # T is derived from the budget: little is left unspent
    r = subprocess.run([sys.executable, "-m", "dpaf_ray", "evaluate", str(out), "--test-data", "mnist-5k",
                        "--num-synthetic", "2000", "--epochs", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    written = sorted((out / "evaluation").glob("evaluation-*.json"))
    assert len(written) == 1 and not (out / "release" / "evaluation.json").exists()
    metrics = json.loads(written[0].read_text())
    assert "real_data_accuracy" in metrics["not_private"] and "settings" in metrics
    for key in ("downstream_accuracy", "real_data_accuracy", "fid_domain", "diversity_ratio"):
        assert key in metrics
    assert "fid_inception" not in metrics  # no local Inception weights: never mixed with fid_domain
