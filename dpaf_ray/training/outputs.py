"""What a training run writes: generator, synthetic data, pictures, metrics and the privacy report."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..data.dataset import ImageDataset
from ..data.sources import write_parquet
from ..evaluation.grid import save_curves, save_sample_grid
from ..models.architecture import architecture_for
from ..models.generator import ConditionalGenerator
from ..privacy.ledger import PrivacyLedger
from .loop import TrainResult

# Knobs that are private to the trusted run directory and never enter a release.
_NOT_RELEASED = {"seed", "data_root", "extra_fixed_releases"}


def privacy_report(cfg: TrainConfig, ledger: PrivacyLedger, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """ε from the ledger of what ran; the events let anyone recompute it."""
    report = {
        "epsilon": ledger.epsilon(cfg.delta),
        "target_epsilon": cfg.epsilon,
        "delta": cfg.delta,
        **ledger.to_json(),
        "knobs": {k: v for k, v in cfg.to_dict().items() if k not in _NOT_RELEASED},
    }
    report.update(extra or {})
    return report


def save_generator(path: Path, generator: ConditionalGenerator, shape: tuple[int, int, int], num_classes: int) -> None:
    torch.save({"state_dict": generator.state_dict(), "shape": list(shape), "num_classes": num_classes,
                "z_dim": generator.z_dim, "smooth_output": generator.smooth_output,
                "upsample": generator.upsample}, path)


def load_generator(path: str | Path) -> ConditionalGenerator:
    blob = torch.load(path, map_location="cpu", weights_only=False)
    g = ConditionalGenerator(architecture_for(tuple(blob["shape"])), blob["num_classes"], blob["z_dim"],
                             smooth_output=blob.get("smooth_output", False),
                             upsample=blob.get("upsample", "nearest"))
    g.load_state_dict(blob["state_dict"])
    g.eval()
    return g


def generate(generator: ConditionalGenerator, n: int, num_classes: int, seed: int = 0, batch: int = 500) -> ImageDataset:
    """n labelled images, classes drawn uniformly (no privacy cost), as uint8."""
    labels = torch.randint(num_classes, (n,), generator=torch.Generator().manual_seed(seed))
    parts = [generate_for_labels(generator, labels[i:i + batch], seed=seed * 100_003 + i) for i in range(0, n, batch)]
    x = torch.cat(parts) if parts else torch.zeros(0, generator.arch.channels, generator.arch.size, generator.arch.size)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return ImageDataset(images, labels, num_classes, "synthetic")


def write_outputs(out: Path, result: TrainResult, num_synthetic: int, shape: tuple[int, int, int],
                  extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    trainer, cfg = result.trainer, result.plan.config
    gen = trainer.generator.eval()
    save_generator(out / "generator.pt", gen, shape, trainer.num_classes)
    synthetic = generate(gen, num_synthetic, trainer.num_classes, seed=1)
    write_parquet(synthetic, out / "synthetic.parquet")
    per_class = 10
    labels = torch.arange(trainer.num_classes).repeat_interleave(per_class)
    grid = generate_for_labels(gen, labels)
    save_sample_grid(grid, labels, trainer.num_classes, out / "samples.png", per_class=per_class)
    if result.history.get("iteration"):
        save_curves(result.history, out / "curves.png")
    eps = result.ledger.epsilon(cfg.delta)
    metrics = {
        "epsilon": eps,
        "iterations_executed": result.iterations_done,
        "iterations_planned": result.plan.iterations,
        "stopped_early": result.stopped_early,
        "train_seconds": result.seconds,
        "seconds_per_iteration": result.seconds / max(1, result.iterations_done),
        "num_synthetic": num_synthetic,
        **(extra_metrics or {}),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    report = privacy_report(cfg, result.ledger, {
        "iterations_executed": result.iterations_done,
        "sampling_rate": result.plan.schedule.sampling_rate,
        "noise_factor": result.plan.noise_factor,
        "model": cfg.model,
    })
    (out / "privacy_report.json").write_text(json.dumps(report, indent=1, default=_json_default))
    return metrics


def generate_for_labels(generator: ConditionalGenerator, labels: torch.Tensor, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return generator(torch.randn(len(labels), generator.z_dim, generator=g), labels)


def _json_default(o: Any) -> Any:
    if isinstance(o, float) and math.isinf(o):
        return "inf"
    raise TypeError(type(o))
