"""Class-conditional generator. It never sees private data (docs/design.md §2)."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .architecture import Architecture, architecture_for
from .label_classifier import LabelClassifier

# `with_labeller`'s keyword arguments: how a release's synthetic set is drawn (post-processing only,
# `dpaf_ray.release.sample_synthetic`).
RELEASE_KNOBS = ("between_class_fraction", "uncertain_fraction")


RETIRED_DRAWS = ("pixel_mix_fraction", "boundary_fraction")  # in the labeller spec of older generator.pt files


class ConditionalGenerator(nn.Module):
    """DCGAN-style upsampling generator; GroupNorm (per-sample) so sharding the
    generated batch over workers does not change any sample. Its architecture, including
    the optional output low-pass, is public: G never reads private data. `class_names[k]` names
    label k where the user named the classes (public facts, saved in generator.pt); None otherwise."""

    def __init__(self, arch: Architecture, num_classes: int, z_dim: int = 64, smooth_output: bool = False,
                 class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        self.arch, self.num_classes, self.z_dim = arch, num_classes, z_dim
        self.smooth_output = smooth_output
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.class_names: tuple[str, ...] | None = None if class_names is None else tuple(class_names)
        w = arch.gen_width
        self.label_embedding = nn.Embedding(num_classes, z_dim)
        # The run's DP label classifier, on a released copy only (`with_labeller`): it labels the synthetic set.
        self.labeller: LabelClassifier | None = None
        self.between_class_fraction = 0.0
        self.uncertain_fraction = 0.0
        self.stem = nn.Sequential(nn.Linear(2 * z_dim, w * arch.gen_start ** 2), nn.LeakyReLU(0.2))
        blocks: list[nn.Module] = []
        for _ in range(arch.gen_blocks):
            out = max(16, w // 2)
            blocks += [
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w, out, 3, padding=1),
                nn.GroupNorm(min(8, out // 4), out),
                nn.LeakyReLU(0.2),
            ]
            w = out
        self.blocks = nn.Sequential(*blocks)
        self.to_image = nn.Conv2d(w, arch.channels, 3, padding=1)
        if smooth_output:
            # A fixed 3×3 binomial low-pass before tanh: the discriminator's stride-2 public
            # features and 2×2 pixel windows cannot see pixel-level speckle, so G is not
            # allowed to draw it.
            b = torch.tensor([1.0, 2.0, 1.0])
            k = (b[:, None] * b[None, :]) / 16
            self.register_buffer("low_pass", k.expand(arch.channels, 1, 3, 3).clone())

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.decode(z, self.label_embedding(labels))

    def decode(self, z: torch.Tensor, label_codes: torch.Tensor) -> torch.Tensor:
        """Images from codes and label embeddings; an embedding between two classes' rows
        asks for an image between them (post-processing of the released G)."""
        h = torch.cat([z, label_codes], dim=1)
        h = self.stem(h).view(z.shape[0], -1, self.arch.gen_start, self.arch.gen_start)
        out = self.to_image(self.blocks(h))
        if self.smooth_output:
            out = F.conv2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), self.low_pass, groups=self.arch.channels)
        return torch.tanh(out)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def sample(self, n: int | None = None, labels: torch.Tensor | list[int] | None = None, seed: int = 0,
               batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """(images in [-1, 1] on the CPU, labels): `n` images with uniform classes, or one per label.

        Sampling is post-processing of the released generator: it costs no privacy."""
        g = torch.Generator().manual_seed(seed)
        if labels is None:
            if n is None:
                raise ValueError("give n (classes drawn uniformly) or labels")
            labels = torch.randint(self.num_classes, (n,), generator=g)
        labels = torch.as_tensor(labels, dtype=torch.long)
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes})")
        was_training = self.training
        self.eval()
        out = []
        for i in range(0, len(labels), batch):
            y = labels[i:i + batch]
            z = torch.randn(len(y), self.z_dim, generator=g)
            out.append(self(z.to(self.device), y.to(self.device)).cpu())
        self.train(was_training)
        images = torch.cat(out) if out else torch.zeros(0, self.arch.channels, self.arch.size, self.arch.size)
        return images, labels

    def with_labeller(self, labeller: LabelClassifier, between_class_fraction: float,
                      uncertain_fraction: float = 0.0) -> "ConditionalGenerator":
        """A copy of G that carries the run's DP label classifier, for the release. Its synthetic set
        (`dpaf_ray.release.sample_synthetic`) then holds a fraction of images drawn between two
        classes, and the classifier labels every image: a student learns a teacher's boundary from images near it, not
        from those the teacher is sure of (data-free distillation). The classifier is a DP-SGD release
        that the ledger charged in phase one and nothing changed after, so shipping it and labelling
        with it is post-processing. G itself is not touched."""
        for name, value in (("between_class_fraction", between_class_fraction),
                            ("uncertain_fraction", uncertain_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        released = copy.deepcopy(self)
        released.labeller = copy.deepcopy(labeller).to(self.device).eval().requires_grad_(False)
        released.between_class_fraction = float(between_class_fraction)
        released.uncertain_fraction = float(uncertain_fraction)
        return released

    def save(self, path: str | Path) -> None:
        blob = {"state_dict": {k: v.cpu() for k, v in self.state_dict().items()},
                "shape": [self.arch.channels, self.arch.size, self.arch.size],
                "num_classes": self.num_classes, "z_dim": self.z_dim, "smooth_output": self.smooth_output}
        if self.class_names is not None:
            blob["class_names"] = list(self.class_names)
        if self.labeller is not None:
            blob["labeller"] = {"width": self.labeller.width, "hidden": self.labeller.hidden_dim,
                                "between_class_fraction": self.between_class_fraction,
                                "uncertain_fraction": self.uncertain_fraction}
        torch.save(blob, path)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> ConditionalGenerator:
    """A generator saved by `ConditionalGenerator.save` (a release's generator.pt), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "release" / "generator.pt" if (path / "release" / "generator.pt").exists() else path / "generator.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no generator there; pass a release/ folder, a run directory or a generator.pt")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    # Files written before options were removed name them; this version draws what they held only at their defaults.
    if blob.get("upsample", "nearest") != "nearest" or any(blob.get("labeller", {}).get(k) for k in RETIRED_DRAWS):
        raise ValueError(f"{path}: written with an option this version no longer has (docs/results.md, "
                         "\"Tried, not kept\"); load it with the version that wrote it")
    g = ConditionalGenerator(architecture_for(tuple(blob["shape"])), blob["num_classes"], blob["z_dim"],
                             smooth_output=blob.get("smooth_output", False), class_names=blob.get("class_names"))
    if "labeller" in blob:
        spec = blob["labeller"]
        g = g.with_labeller(LabelClassifier(g.arch, g.num_classes, spec["width"], spec["hidden"]),
                            spec["between_class_fraction"], spec.get("uncertain_fraction", 0.0))
    g.load_state_dict(blob["state_dict"])
    return g.to(device).eval()
