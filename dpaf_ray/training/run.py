"""One training run from a configuration: data, plan, loop (in-process or Ray Train), outputs."""
from __future__ import annotations

import dataclasses
import json
import secrets
import warnings
from pathlib import Path
from typing import Any, Callable

from ..config import TrainConfig
from ..data import check_image_shape, load_dataset, split_validation
from ..data.dataset import ImageDataset
from ..models.architecture import SUPPORTED_SHAPES
from ..privacy.calibration import warn_large_delta
from .checkpoint import LocalCheckpointSink
from .loop import TrainResult, train_loop
from .outputs import write_outputs
from .plan import TrainingPlan, plan_training

VALIDATION_SPLIT_SEED = 0  # public: which records are held out does not depend on the run


def resolve_seed(cfg: TrainConfig) -> TrainConfig:
    if cfg.seed is None:
        return dataclasses.replace(cfg, seed=secrets.randbits(31))
    return cfg


def load_training_data(cfg: TrainConfig) -> tuple[ImageDataset, ImageDataset]:
    """(train, private validation): the validation split is never trained on."""
    ds = load_dataset(cfg.dataset, "train", cfg.data_root)
    check_image_shape(ds, SUPPORTED_SHAPES)
    train, val = split_validation(ds, cfg.validation_fraction, VALIDATION_SPLIT_SEED)
    return train, val


def prepare(cfg: TrainConfig) -> tuple[TrainConfig, ImageDataset, ImageDataset, TrainingPlan]:
    cfg = resolve_seed(cfg.validate())
    train, val = load_training_data(cfg)
    warn_large_delta(cfg.delta, len(train))
    plan = plan_training(cfg, len(train))
    return plan.config, train, val, plan


def run_train(cfg: TrainConfig, out: str | Path, num_synthetic: int = 10_000, num_workers: int = 0,
              use_gpu: bool = False, address: str | None = None, resume: bool = True,
              progress: Callable[[str], None] | None = print) -> dict[str, Any]:
    cfg, train, _val, plan = prepare(cfg)  # every check before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if progress:
        progress(f"{cfg.model} on {cfg.dataset}: N={len(train)} training records, q={plan.schedule.sampling_rate:.4g}, "
                 f"T={plan.iterations} iterations for ε={cfg.epsilon:g}, δ={cfg.delta:g}"
                 + (f" (noise ×{plan.noise_factor:.3f} to fit the iteration cap)" if plan.noise_factor != 1 else ""))
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    if num_workers == 0:
        if use_gpu:
            warnings.warn("--use-gpu without --num-workers: training in-process on cuda if available")
        import torch

        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        result = train_loop(plan, train, len(train), 0, None, LocalCheckpointSink(out, resume), progress, device)
    else:
        from ..distributed.ray_train import fit_with_ray_train

        result = fit_with_ray_train(plan, train, num_workers, use_gpu, address, out, progress)
    metrics = write_outputs(out, result, num_synthetic, train.shape, {"seed": cfg.seed, "num_workers": num_workers})
    if progress:
        progress(f"done: {result.iterations_done} iterations, ε={metrics['epsilon']:.3f} (δ={cfg.delta:g}); "
                 f"outputs in {out}")
    return metrics


__all__ = ["run_train", "prepare", "load_training_data", "TrainResult"]
