"""What a trained generator produces: a labelled synthetic data set and a sample grid.

All of it is post-processing of the generator (no privacy cost). Where it goes, and what
may be published, is decided in `dpaf_ray.release`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..data.dataset import ImageDataset
from ..data.sources import write_parquet
from ..models.generator import ConditionalGenerator
from ..pictures import save_sample_grid

SAMPLES_PER_CLASS = 10
SYNTHETIC_SEED = 1  # public
GRID_SEED = 2  # public


def generate(generator: ConditionalGenerator, n: int, seed: int = SYNTHETIC_SEED) -> ImageDataset:
    """n labelled images as uint8: classes drawn uniformly, or, when the released G carries the run's
    DP label classifier, some between two classes and labelled by it (`sample_synthetic`)."""
    x, labels = generator.sample_synthetic(n, seed=seed)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return ImageDataset(images, labels, generator.num_classes, "synthetic")


def label_balance_warning(generator: ConditionalGenerator, synthetic: ImageDataset) -> str | None:
    """A class with under a third of its even share of `synthetic`, drawn from `generator`: labels that
    a poor DP classifier gave (after a forced classifier phase on little data) can nearly empty a
    class, which the user must hear of. None without a labeller (G's asked classes are even)."""
    if generator.labeller is None:
        return None
    counts = torch.bincount(synthetic.labels, minlength=synthetic.num_classes)
    low = [k for k, c in enumerate(counts.tolist()) if c < len(synthetic) / (3 * synthetic.num_classes)]
    if not low:
        return None
    return (f"the released synthetic set holds under a third of an even share of class(es) {low} "
            f"({', '.join(str(counts[k].item()) for k in low)} of {len(synthetic)} images): its labels come from the "
            "run's DP label classifier, which rarely gives these (a poor classifier at this budget; its labels still "
            "helped on average at Fashion-MNIST ε = 0.2). If every class must be represented, --no-classifier-labels "
            "releases the classes G was asked for")


def write_artefacts(directory: Path, generator: ConditionalGenerator, num_synthetic: int,
                    synthetic: ImageDataset | None = None) -> ImageDataset:
    """generator.pt, synthetic.parquet and samples.png in `directory`; returns the synthetic set.

    The generator may sit on any device: it is saved from CPU copies, and `sample` feeds it inputs
    on its own device and returns CPU tensors. `synthetic`: the set, when it was generated
    elsewhere (a Tune trial generates on its workers' GPU)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator.save(directory / "generator.pt")
    if synthetic is None:
        synthetic = generate(generator, num_synthetic)
    write_parquet(synthetic, directory / "synthetic.parquet")
    labels = torch.arange(generator.num_classes).repeat_interleave(SAMPLES_PER_CLASS)
    grid, _ = generator.sample(labels=labels, seed=GRID_SEED)
    save_sample_grid(grid, labels, generator.num_classes, directory / "samples.png", per_class=SAMPLES_PER_CLASS)
    return synthetic
