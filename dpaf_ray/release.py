"""The release: the only files that may be published, written in this one place (docs/design.md rule 15).

    OUT/release/
      generator.pt         the class-conditional generator; after a DP label-classifier phase also
                           that classifier, which labels synthetic.parquet (a release the ledger charged)
      synthetic.parquet    labelled synthetic images
      samples.png          10 samples per class
      score.json           the noisy validation score (tune.py), or why there is none (train)
      privacy_report.json  ε from the ledger, the events to recompute it, the assumptions

Everything else a run writes (configuration and seeds, timings, curves, the ledger file,
checkpoints, which hold the run secret, trial records, evaluation results) stays outside
`release/`. The folder appears whole or not at all, and nothing writes into it afterwards:
`is_release_dir` lets other commands refuse to.

What goes into the folder is made here too: the labelled synthetic set drawn from the generator
(`sample_synthetic`: with the run's DP label classifier, part of it between two classes or least
certain, every image labelled by that classifier) and the
sample grid. All of it is post-processing of the released generator (no privacy cost).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .data.dataset import ImageDataset
from .data.sources import write_parquet
from .models.architecture import architecture_for
from .models.generator import ConditionalGenerator
from .pictures import save_sample_grid
from .privacy.report import write_report

RELEASE_DIR = "release"
ARTEFACT_FILES = ("generator.pt", "synthetic.parquet", "samples.png")
RELEASE_FILES = ARTEFACT_FILES + ("score.json", "privacy_report.json")

SAMPLES_PER_CLASS = 10
SYNTHETIC_SEED = 1  # public
GRID_SEED = 2  # public
# A release's least certain images are picked from a pool this many times their number
# (bench/results/utility_15: 3, the only size measured; the share is off by default).
UNCERTAIN_POOL = 3


def is_release_dir(path: str | Path) -> bool:
    """A folder written by `write_release` (or named like one)."""
    path = Path(path).resolve()
    return path.name == RELEASE_DIR or (path / "privacy_report.json").exists() and (path / "score.json").exists()


def write_release(out: Path, artefacts: Path | Callable[[Path], Any] | None, score: dict[str, Any] | None,
                  privacy_report: dict[str, Any]) -> Path:
    """Write OUT/release atomically: `artefacts` is a folder holding the three artefact files
    (a trial's) or a function that writes them into the folder it is given."""
    release = out / RELEASE_DIR
    tmp = out / (RELEASE_DIR + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if callable(artefacts):
        artefacts(tmp)
    elif artefacts is not None:
        for name in ARTEFACT_FILES:
            shutil.copy2(Path(artefacts) / name, tmp / name)
    extra = sorted(p.name for p in tmp.iterdir() if p.name not in ARTEFACT_FILES)
    if extra:
        raise RuntimeError(f"refusing to release files outside the release set: {extra}")
    (tmp / "score.json").write_text(json.dumps(score if score is not None else {"score": None}, indent=1))
    write_report(tmp / "privacy_report.json", privacy_report)
    if release.exists():
        shutil.rmtree(release)
    tmp.replace(release)
    return release


def generate(generator: ConditionalGenerator, n: int, seed: int = SYNTHETIC_SEED) -> ImageDataset:
    """n labelled images as uint8: classes drawn uniformly, or, when the released G carries the run's
    DP label classifier, some between two classes and labelled by it (`sample_synthetic`)."""
    x, labels = sample_synthetic(generator, n, seed=seed)
    images = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return ImageDataset(images, labels, generator.num_classes, "synthetic", generator.class_names)


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
    The generator's class names, where the user gave them, go into all three (row labels of the grid,
    the Parquet metadata `dpaf_ray.class_names`).

    The generator may sit on any device: it is saved from CPU copies, and `sample` feeds it inputs
    on its own device and returns CPU tensors. `synthetic`: the set, when it was generated
    elsewhere (a Tune trial generates on its workers' GPU)."""
    directory.mkdir(parents=True, exist_ok=True)
    generator.save(directory / "generator.pt")
    if synthetic is None:
        synthetic = generate(generator, num_synthetic)
    if synthetic.class_names != generator.class_names:  # the class names are the released G's (public facts)
        synthetic = dataclasses.replace(synthetic, class_names=generator.class_names)
    write_parquet(synthetic, directory / "synthetic.parquet")
    labels = torch.arange(generator.num_classes).repeat_interleave(SAMPLES_PER_CLASS)
    grid, _ = generator.sample(labels=labels, seed=GRID_SEED)
    save_sample_grid(grid, labels, generator.num_classes, directory / "samples.png", per_class=SAMPLES_PER_CLASS,
                     class_names=generator.class_names)
    return synthetic


def estimate_release_seconds(shape: tuple[int, int, int], num_classes: int, num_synthetic: int, z_dim: int = 64,
                             sample: int = 200) -> float:
    """Seconds that writing a release of `num_synthetic` images will take, so that a time budget can cover
    it: an untrained generator of the same architecture (public, no data) writes the artefacts with `sample`
    images into a temporary folder, and the per-image part (drawing, PNG encoding) is scaled up. A DP label
    classifier's passes over the synthetic set are not included."""
    m = max(1, min(sample, num_synthetic))
    generator = ConditionalGenerator(architecture_for(shape), num_classes, z_dim)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        synthetic = generate(generator, m)
        write_parquet(synthetic, Path(d) / "per_image.parquet")
        per_image = (time.perf_counter() - t0) / m
        t1 = time.perf_counter()
        write_artefacts(Path(d) / "artefacts", generator, m, synthetic=synthetic)
        whole = time.perf_counter() - t1
    return whole + per_image * max(0, num_synthetic - m)


@torch.no_grad()
def sample_synthetic(generator: ConditionalGenerator, n: int, seed: int = 0,
                     batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic data set: `generator.sample(n)` without a labeller; with one, images of which a fraction
    `between_class_fraction` come from a label code e = (1−λ)·e(y1) + λ·e(y2), λ ~ U(0, 1), the
    others of one class y1, every image labelled by the classifier's argmax; and a fraction
    `uncertain_fraction` of the set is chosen from a pool of UNCERTAIN_POOL times as many such
    images as those the classifier is least sure of (smallest gap between its two largest
    probabilities), an even number per label, as active learning picks the cases a student gets
    wrong. (Labelling an image between y1 and y2 with the better of those two alone, which no
    poor classifier could unbalance, released 2 points less: bench/results/utility_14/.)
    The fractions are the generator's (`ConditionalGenerator.with_labeller`)."""
    if generator.labeller is None:
        return generator.sample(n, seed=seed, batch=batch)
    g = torch.Generator().manual_seed(seed)
    was_training = generator.training
    generator.eval()
    m = round(n * generator.uncertain_fraction)
    images, labels, _ = labelled_draw(generator, n - m, g, batch)
    if m:
        pool, pool_labels, margin = labelled_draw(generator, UNCERTAIN_POOL * m, g, batch)
        pick = least_certain(pool_labels, margin, m, generator.num_classes)
        images, labels = torch.cat([images, pool[pick]]), torch.cat([labels, pool_labels[pick]])
    generator.train(was_training)
    return images, labels


def labelled_draw(generator: ConditionalGenerator, n: int, g: torch.Generator,
                  batch: int) -> tuple[torch.Tensor, ...]:
    """n images (a share between two classes), the classifier's argmax labels and its top-2 gaps."""
    arch = generator.arch
    images, labels, margins = [torch.empty(0, arch.channels, arch.size, arch.size)], \
        [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
    for i in range(0, n, batch):
        m = min(batch, n - i)
        y1 = torch.randint(generator.num_classes, (m,), generator=g)
        y2 = torch.randint(generator.num_classes, (m,), generator=g)
        between = torch.rand(m, generator=g) < generator.between_class_fraction
        lam = torch.rand(m, generator=g) * between
        z = torch.randn(m, generator.z_dim, generator=g)
        device = generator.device
        codes = generator.label_embedding(y1.to(device)) * (1 - lam[:, None]).to(device) + \
            generator.label_embedding(y2.to(device)) * lam[:, None].to(device)
        x = generator.decode(z.to(device), codes)
        top2 = generator.labeller(x).softmax(1).topk(2, dim=1)
        images.append(x.cpu())
        labels.append(top2.indices[:, 0].cpu())
        margins.append((top2.values[:, 0] - top2.values[:, 1]).cpu())
    return torch.cat(images), torch.cat(labels), torch.cat(margins)


def least_certain(labels: torch.Tensor, margin: torch.Tensor, m: int, num_classes: int) -> torch.Tensor:
    """Indices of m images with the smallest margins, m // num_classes per label where the pool
    has them, the rest the smallest margins left (so a class the classifier rarely gives cannot
    shrink the set)."""
    chosen = torch.zeros(len(labels), dtype=torch.bool)
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        chosen[idx[margin[idx].argsort()[: m // num_classes]]] = True
    rest = (~chosen).nonzero().flatten()
    chosen[rest[margin[rest].argsort()[: m - int(chosen.sum())]]] = True
    return chosen.nonzero().flatten()
