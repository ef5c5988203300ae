"""Class-conditional generator. It never sees private data (DESIGN §2)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from ..config import UPSAMPLE_MODES
from .architecture import Architecture, architecture_for
from .label_classifier import LabelClassifier

# A release's least certain images are picked from a pool this many times their number
# (bench/results/utility_15: 3, the only size measured; the share is off by default).
UNCERTAIN_POOL = 3
# A release's boundary images take this many steps of this L2 length (pixels in [-1, 1]) down the
# classifier's top-2 logit gap (bench/results/utility_18: the one setting measured; both shares are off by default).
BOUNDARY_STEPS, BOUNDARY_STEP_LENGTH = 3, 1.0
# `with_labeller`'s keyword arguments: how a release's synthetic set is drawn (post-processing only).
RELEASE_KNOBS = ("between_class_fraction", "uncertain_fraction", "pixel_mix_fraction", "boundary_fraction")


class ConditionalGenerator(nn.Module):
    """DCGAN-style upsampling generator; GroupNorm (per-sample) so sharding the
    generated batch over workers does not change any sample. Its architecture, including
    the optional output low-pass, is public: G never reads private data."""

    def __init__(self, arch: Architecture, num_classes: int, z_dim: int = 64, smooth_output: bool = False,
                 upsample: str = "nearest", width: int | None = None) -> None:
        super().__init__()
        if upsample not in UPSAMPLE_MODES:
            raise ValueError(f"upsample must be one of {UPSAMPLE_MODES}, got {upsample!r}")
        self.arch, self.num_classes, self.z_dim = arch, num_classes, z_dim
        self.smooth_output, self.upsample = smooth_output, upsample
        w = self.width = width or arch.gen_width
        self.label_embedding = nn.Embedding(num_classes, z_dim)
        # The run's DP label classifier, on a released copy only (`with_labeller`): it labels the synthetic set.
        self.labeller: LabelClassifier | None = None
        self.between_class_fraction = 0.0
        self.uncertain_fraction = 0.0
        self.pixel_mix_fraction = 0.0
        self.boundary_fraction = 0.0
        self.stem = nn.Sequential(nn.Linear(2 * z_dim, w * arch.gen_start ** 2), nn.LeakyReLU(0.2))
        blocks: list[nn.Module] = []
        for _ in range(arch.gen_blocks):
            out = max(16, w // 2)
            blocks += [
                # bilinear: nearest doubling leaves a block grid that the 3×3 conv turns into a
                # cross-hatch at the 4-pixel period of two doublings
                nn.Upsample(scale_factor=2, mode=upsample),
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
                      uncertain_fraction: float = 0.0, pixel_mix_fraction: float = 0.0,
                      boundary_fraction: float = 0.0) -> "ConditionalGenerator":
        """A copy of G that carries the run's DP label classifier, for the release. Its synthetic set
        (`sample_synthetic`) then holds a fraction of images drawn between two classes, and the
        classifier labels every image: a student learns a teacher's boundary from images near it, not
        from those the teacher is sure of (data-free distillation). The classifier is a DP-SGD release
        that the ledger charged in phase one and nothing changed after, so shipping it and labelling
        with it is post-processing. G itself is not touched."""
        for name, value in (("between_class_fraction", between_class_fraction),
                            ("uncertain_fraction", uncertain_fraction), ("pixel_mix_fraction", pixel_mix_fraction),
                            ("boundary_fraction", boundary_fraction)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {value}")
        released = copy.deepcopy(self)
        released.labeller = copy.deepcopy(labeller).to(self.device).eval().requires_grad_(False)
        released.between_class_fraction = float(between_class_fraction)
        released.uncertain_fraction = float(uncertain_fraction)
        released.pixel_mix_fraction = float(pixel_mix_fraction)
        released.boundary_fraction = float(boundary_fraction)
        return released

    @torch.no_grad()
    def sample_synthetic(self, n: int, seed: int = 0, batch: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
        """The synthetic data set: `sample(n)` without a labeller; with one, images of which a fraction
        `between_class_fraction` come from a label code e = (1−λ)·e(y1) + λ·e(y2), λ ~ U(0, 1), the
        others of one class y1, every image labelled by the classifier's argmax; and a fraction
        `uncertain_fraction` of the set is chosen from a pool of UNCERTAIN_POOL times as many such
        images as those the classifier is least sure of (smallest gap between its two largest
        probabilities), an even number per label, as active learning picks the cases a student gets
        wrong. Then a fraction `pixel_mix_fraction` of the set is mixed in pixels with another image of
        it, (1−λ)·x + λ·x', λ ~ U(0, 1) (mixup inputs for distillation: Beyer et al., "Knowledge
        distillation: A good teacher is patient and consistent", CVPR 2022), and a fraction
        `boundary_fraction` takes BOUNDARY_STEPS steps down the classifier's top-2 logit gap (Heo et
        al., "Knowledge Distillation with Adversarial Samples Supporting Decision Boundary", AAAI
        2019); the classifier labels each changed image anew. Both are off by default (bench/results/
        utility_18). (Labelling an image between y1 and y2 with the better of those two alone, which no
        poor classifier could unbalance, released 2 points less: bench/results/utility_14/.)"""
        if self.labeller is None:
            return self.sample(n, seed=seed, batch=batch)
        g = torch.Generator().manual_seed(seed)
        was_training = self.training
        self.eval()
        m = round(n * self.uncertain_fraction)
        images, labels, _ = self._labelled_draw(n - m, g, batch)
        if m:
            pool, pool_labels, margin = self._labelled_draw(UNCERTAIN_POOL * m, g, batch)
            pick = least_certain(pool_labels, margin, m, self.num_classes)
            images, labels = torch.cat([images, pool[pick]]), torch.cat([labels, pool_labels[pick]])
        if self.pixel_mix_fraction:
            mixed = torch.rand(len(images), generator=g) < self.pixel_mix_fraction
            partners = images[torch.randint(len(images), (int(mixed.sum()),), generator=g)]
            lam = torch.rand(len(partners), 1, 1, 1, generator=g)
            images[mixed] = (1 - lam) * images[mixed] + lam * partners
            labels[mixed] = self.label_with_classifier(images[mixed], batch)
        if self.boundary_fraction:
            moved = torch.rand(len(images), generator=g) < self.boundary_fraction
            images[moved] = self.towards_boundary(images[moved], batch)
            labels[moved] = self.label_with_classifier(images[moved], batch)
        self.train(was_training)
        return images, labels

    def label_with_classifier(self, x: torch.Tensor, batch: int) -> torch.Tensor:
        """The classifier's argmax labels of images, on the CPU (the release's labels; bench/refine_screen.py reuses it)."""
        return torch.cat([torch.empty(0, dtype=torch.long)] +
                         [self.labeller(x[i:i + batch].to(self.device)).argmax(1).cpu()
                          for i in range(0, len(x), batch)])

    def towards_boundary(self, x: torch.Tensor, batch: int, steps: int = BOUNDARY_STEPS,
                         length: float = BOUNDARY_STEP_LENGTH) -> torch.Tensor:
        """x after `steps` steps of L2 length `length` that shrink the gap between the classifier's two
        largest logits, kept in the image range [-1, 1] (bench/refine_screen.py screens other steps)."""
        out = [torch.empty(0, *x.shape[1:])]
        for i in range(0, len(x), batch):
            xb = x[i:i + batch].to(self.device)
            for _ in range(steps):
                with torch.enable_grad():
                    xb.requires_grad_(True)
                    top2 = self.labeller(xb).topk(2, dim=1).values
                    (grad,) = torch.autograd.grad((top2[:, 0] - top2[:, 1]).sum(), xb)
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
                xb = (xb.detach() - length * grad / norm).clamp(-1, 1)
            out.append(xb.cpu())
        return torch.cat(out)

    def _labelled_draw(self, n: int, g: torch.Generator, batch: int) -> tuple[torch.Tensor, ...]:
        """n images (a share between two classes), the classifier's argmax labels and its top-2 gaps."""
        images, labels, margins = [torch.empty(0, self.arch.channels, self.arch.size, self.arch.size)], \
            [torch.empty(0, dtype=torch.long)], [torch.empty(0)]
        for i in range(0, n, batch):
            m = min(batch, n - i)
            y1, y2 = torch.randint(self.num_classes, (m,), generator=g), torch.randint(self.num_classes, (m,), generator=g)
            between = torch.rand(m, generator=g) < self.between_class_fraction
            lam = torch.rand(m, generator=g) * between
            z = torch.randn(m, self.z_dim, generator=g)
            codes = self.label_embedding(y1.to(self.device)) * (1 - lam[:, None]).to(self.device) + \
                self.label_embedding(y2.to(self.device)) * lam[:, None].to(self.device)
            x = self.decode(z.to(self.device), codes)
            top2 = self.labeller(x).softmax(1).topk(2, dim=1)
            images.append(x.cpu())
            labels.append(top2.indices[:, 0].cpu())
            margins.append((top2.values[:, 0] - top2.values[:, 1]).cpu())
        return torch.cat(images), torch.cat(labels), torch.cat(margins)

    def save(self, path: str | Path) -> None:
        blob = {"state_dict": {k: v.cpu() for k, v in self.state_dict().items()},
                "shape": [self.arch.channels, self.arch.size, self.arch.size],
                "num_classes": self.num_classes, "z_dim": self.z_dim, "smooth_output": self.smooth_output,
                "upsample": self.upsample, "width": self.width}
        if self.labeller is not None:
            blob["labeller"] = {"width": self.labeller.width, "hidden": self.labeller.hidden_dim,
                                "between_class_fraction": self.between_class_fraction,
                                "uncertain_fraction": self.uncertain_fraction,
                                "pixel_mix_fraction": self.pixel_mix_fraction, "boundary_fraction": self.boundary_fraction}
        torch.save(blob, path)


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


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> ConditionalGenerator:
    """A generator saved by `ConditionalGenerator.save` (a release's generator.pt), in eval mode."""
    path = Path(path)
    if path.is_dir():
        path = path / "release" / "generator.pt" if (path / "release" / "generator.pt").exists() else path / "generator.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no generator there; pass a release/ folder, a run directory or a generator.pt")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    g = ConditionalGenerator(architecture_for(tuple(blob["shape"])), blob["num_classes"], blob["z_dim"],
                             smooth_output=blob.get("smooth_output", False), upsample=blob.get("upsample", "nearest"),
                             width=blob.get("width"))
    if "labeller" in blob:
        spec = blob["labeller"]
        g = g.with_labeller(LabelClassifier(g.arch, g.num_classes, spec["width"], spec["hidden"]),
                            spec["between_class_fraction"], spec.get("uncertain_fraction", 0.0),
                            spec.get("pixel_mix_fraction", 0.0), spec.get("boundary_fraction", 0.0))
    g.load_state_dict(blob["state_dict"])
    return g.to(device).eval()
