"""Fréchet distances between real and synthetic images.

Two feature spaces, reported under separate names and never mixed (docs/design.md §7):

- `fid_inception`: pool3 (2048-d) features of torchvision's Inception-V3, only when its weights
  are available as a LOCAL file (argument or env var `DPAF_INCEPTION_WEIGHTS`). Nothing is ever
  downloaded; without weights `inception_fid` returns None.
- `fid_domain`: penultimate features of the fixed `SmallCNN` trained on real training data.
  Always available, but only comparable with other `fid_domain` numbers for the same data set.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy import linalg
from torch import nn
from torch.nn import functional as F

from dpaf_ray.data.dataset import ImageDataset

INCEPTION_WEIGHTS_ENV = "DPAF_INCEPTION_WEIGHTS"
INCEPTION_SIZE = 299


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2).

    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}), as in the standard FID
    implementation: when the matrix square root is not finite, has a non-negligible imaginary
    part or scipy reports the product singular (e.g. dead features, or fewer samples than feature
    dimensions), it is retried with `eps` added to both diagonals; the remaining tiny imaginary
    part is numerical noise and dropped.
    """
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors differ in shape: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise ValueError(
            f"covariances must both be {(mu1.shape[0],) * 2}, got {sigma1.shape} and {sigma2.shape}"
        )

    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if (
        singular
        or not np.isfinite(covmean).all()
        or (np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3))
    ):
        # Dead ReLU units and few samples make covariances singular; the offset makes the
        # product well conditioned and changes the distance by O(eps * dim).
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > 1e-3:
            warnings.warn(
                f"frechet_distance: dropping an imaginary component of {imag:.3g} from the matrix "
                "square root; use more samples than feature dimensions for a reliable FID",
                RuntimeWarning,
                stacklevel=2,
            )
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))
    # Mathematically >= 0; tiny negatives are rounding error.
    return max(fd, 0.0)


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of an (N, D) feature matrix, in float64."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else features
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N, D) feature matrix with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _subsample(ds: ImageDataset, max_records: int | None, seed: int) -> ImageDataset:
    if max_records is None or len(ds) <= max_records:
        return ds
    gen = torch.Generator().manual_seed(seed)
    return ds.subset(torch.randperm(len(ds), generator=gen)[:max_records])


@torch.no_grad()
def extract_features(
    ds: ImageDataset,
    embed: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run `embed` over `ds` (images in [-1, 1]) batch by batch; returns (N, D) float64 on CPU."""
    out = []
    for start in range(0, len(ds), batch_size):
        x = ds.as_float(slice(start, start + batch_size)).to(device)
        if preprocess is not None:
            x = preprocess(x)
        out.append(embed(x).flatten(1).double().cpu())
    return torch.cat(out)


def _check_compatible(real: ImageDataset, fake: ImageDataset) -> None:
    if real.shape != fake.shape:
        raise ValueError(
            f"real images {real.shape} and synthetic images {fake.shape} differ in shape; "
            "generate at the real data's resolution"
        )


def domain_fid(
    real: ImageDataset,
    fake: ImageDataset,
    feature_model: nn.Module,
    batch_size: int = 512,
    max_records: int | None = None,
    seed: int = 0,
) -> float:
    """FID in the penultimate feature space of a classifier trained on REAL TRAINING data.

    `feature_model` is a `SmallCNN` (its `.features` is used) or any module whose forward
    returns features. Report the result as `fid_domain`, never as an Inception FID.
    """
    _check_compatible(real, fake)
    real, fake = _subsample(real, max_records, seed), _subsample(fake, max_records, seed + 1)
    embed = getattr(feature_model, "features", feature_model)
    was_training = feature_model.training
    feature_model.eval()
    try:
        device = next(feature_model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    try:
        mu1, s1 = feature_statistics(extract_features(real, embed, batch_size, device))
        mu2, s2 = feature_statistics(extract_features(fake, embed, batch_size, device))
    finally:
        feature_model.train(was_training)
    return frechet_distance(mu1, s1, mu2, s2)


def resolve_inception_weights(weights_path: str | os.PathLike | None = None) -> Path | None:
    """The local Inception weights file: the argument, else `$DPAF_INCEPTION_WEIGHTS`, else None.

    A path that is given but missing is an error (a silent None would hide a typo).
    """
    path = weights_path if weights_path is not None else os.environ.get(INCEPTION_WEIGHTS_ENV)
    if path is None or str(path).strip() == "":
        return None
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(
            f"Inception-V3 weights not found at {p}; give a local torchvision inception_v3 "
            f"state dict (e.g. inception_v3_google-0cc3c7bd.pth) or unset {INCEPTION_WEIGHTS_ENV} "
            "to report only fid_domain"
        )
    return p


def load_inception(weights_path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """torchvision Inception-V3 from a local state dict, with `fc` removed so it returns pool3.

    Built with weights=None (no download) and transform_input=False: our images are already in
    [-1, 1], the range the Google-trained weights expect.
    """
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    model.load_state_dict(state)
    model.fc = nn.Identity()  # type: ignore[assignment]
    return model.to(device).eval()


def _inception_preprocess(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    elif x.shape[1] != 3:
        raise ValueError(f"Inception FID needs 1 or 3 channels, got {x.shape[1]}")
    return F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)


def inception_fid(
    real: ImageDataset,
    fake: ImageDataset,
    weights_path: str | os.PathLike | None = None,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    max_records: int | None = None,
    seed: int = 0,
) -> float | None:
    """FID on Inception-V3 pool3 features, or None when no local weights file is configured.

    Images are resized to 299x299 and grayscale is repeated to 3 channels. Report as
    `fid_inception`. Slow on a CPU (about 6 GFLOP per image): cap with `max_records`.
    """
    path = resolve_inception_weights(weights_path)
    if path is None:
        return None
    _check_compatible(real, fake)
    real, fake = _subsample(real, max_records, seed), _subsample(fake, max_records, seed + 1)
    model = load_inception(path, device)
    mu1, s1 = feature_statistics(
        extract_features(real, model, batch_size, device, preprocess=_inception_preprocess)
    )
    mu2, s2 = feature_statistics(
        extract_features(fake, model, batch_size, device, preprocess=_inception_preprocess)
    )
    return frechet_distance(mu1, s1, mu2, s2)
