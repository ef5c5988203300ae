"""The split discriminator D = rear ∘ DPAGG ∘ front (docs/design.md §2).

- `PublicFeatures` (conv1): fixed from a public seed, never updated from private data.
- `PrivateFeatures` (conv2): the only parameters whose update reads private records,
  always through one clipped-and-noised DP-SGD release.
- `Rear` (conv3, FC, class projection): sees released aggregates and generated
  images only, so training it is post-processing.
No BatchNorm anywhere before DPAGG: it would mix records.
"""
from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch.nn import functional as F

from ..config import EMBEDDINGS
from .architecture import Architecture


class PublicFeatures(nn.Module):
    """conv1: random convolutions drawn from a public seed (frozen)."""

    def __init__(self, arch: Architecture, public_seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(public_seed)
        layers: list[nn.Module] = []
        c = arch.channels
        for i in range(arch.fixed_stages):
            out = arch.fixed_width * 2 ** i
            conv = nn.Conv2d(c, out, 4, stride=2, padding=1)
            with torch.no_grad():
                fan_in = c * 16
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
                conv.bias.zero_()
            layers += [conv, nn.LeakyReLU(0.2)]
            c = out
        self.net = nn.Sequential(*layers)
        self.out_channels = c
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PrivateFeatures(nn.Module):
    """conv2: trained only by DP-SGD on real records.

    Returns the pooled conv2 feature map φ (n, c, p, p) and a per-record real/fake logit. No loss
    reads that logit; its head's parameters stay in the module (initialised, released with zero
    gradient plus noise) so that models and checkpoints keep their layout.
    """

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int, feature_channels: int = 16) -> None:
        super().__init__()
        self.pooled = arch.pooled
        self.conv2 = nn.Conv2d(in_channels, feature_channels, 4, stride=2, padding=1)
        m = feature_channels * arch.pooled ** 2
        self.head = nn.Linear(m, 1)
        self.head_projection = nn.Embedding(num_classes, m)
        nn.init.normal_(self.head_projection.weight, std=0.02)
        self.feature_dim = m

    def forward(self, h1: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        phi = F.adaptive_avg_pool2d(F.leaky_relu(self.conv2(h1), 0.2), self.pooled)
        flat = phi.flatten(1)
        logit = self.head(flat).squeeze(1) + (self.head_projection(labels) * flat).sum(1)
        return phi, logit


def soft_bound(e: torch.Tensor) -> torch.Tensor:
    """e / sqrt(1 + ||e||²): norm < 1 and strictly increasing in ||e||.

    DPAGG's hard clip to C_agg keeps only the direction of a record whose embedding is
    longer than C_agg; with raw pooled features (norm 3–6 at C_agg = 1) every record is
    clipped, so a group mean cannot tell a faint image from a saturated one and the
    generator drifts to saturated textures. This public, per-record map keeps the norm
    information (compressed) and makes the hard clip a no-op for C_agg >= 1.
    """
    return e / (1 + e.pow(2).sum(1, keepdim=True)).sqrt()


PIXEL_RFF_FEATURES = 2 * 196  # cos and sin of 196 frequencies, as many values as two 14×14 window moments
# The statistics of DPAF's pixel block (window means of u and u², and the RFF of the whole image). Fixed since
# issue #37: other sets and RFF sizes were measured worse (docs/results.md, "Tried, not kept").
PIXEL_MOMENTS = ("mean", "sq_mean", "rff")


def pixel_statistics_dim(moments: tuple[str, ...], channels: int, pooled: int) -> int:
    return sum(PIXEL_RFF_FEATURES if m == "rff" else channels * pooled ** 2 for m in moments)


@functools.lru_cache(maxsize=8)
def _pixel_frequencies(d: int, n: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)  # public
    return (torch.randn(d, n, generator=g) / (0.3 * math.sqrt(d))).to(device, dtype)


def pixel_statistics(x: torch.Tensor, pooled: int, moments: tuple[str, ...] = ("mean", "sq_mean")) -> torch.Tensor:
    """Statistics of each record's intensity: a fixed, public per-record map (like conv1).

    Pooled conv2 features barely see fine spatial structure, so a generator can match their
    class means with speckled textures; local means of u pin down the shape. With u = (x+1)/2:

    - ``mean``: window mean of u;
    - ``sq_mean``: window mean of u², so class means also carry the spread of each window;
    - ``rff``: random Fourier features of the whole image u (public seed, Gaussian kernel of
      length 0.3·√pixels): class means of them are kernel mean embeddings, which see how
      pixels vary together, where the window moments only see each window alone.
    """
    u = (x + 1) / 2  # [0, 1]: background 0, so u² is small where the image is empty
    parts = []
    for m in moments:
        if m == "mean":
            parts.append(F.adaptive_avg_pool2d(u, pooled).flatten(1))
        elif m == "sq_mean":
            parts.append(F.adaptive_avg_pool2d(u * u, pooled).flatten(1))
        elif m == "rff":
            flat = u.flatten(1)
            proj = flat @ _pixel_frequencies(flat.shape[1], PIXEL_RFF_FEATURES // 2, str(flat.device), flat.dtype)
            parts.append(0.5 * torch.cat([proj.cos(), proj.sin()], dim=1))
        else:
            raise ValueError(f"unknown pixel moment {m!r}")
    return torch.cat(parts, dim=1)  # (n, pixel_statistics_dim)


class RecordEmbedding(nn.Module):
    """The non-linear per-record embedding that DPAGG sums (docs/design.md §3a).

    - ``moments``: scale·[φ, φ⊙φ]; group sums carry second moments, so a collapsed group
      (one image repeated) differs from a diverse one with the same mean.
    - ``linear``: scale·φ; group means only show first moments (the conv2 release audit's).
    Both pass through `soft_bound`, so their norm stays below 1 and still tells records
    apart by magnitude (a hard clip of the raw features would not).

    With ``pixel_dim`` > 0 a second block, the soft-bounded public `pixel_statistics`, follows
    the conv2 block; both are divided by √2 so the whole embedding has norm below 1.
    `out_shape` is the spatial layout of the conv2 block only.
    """

    def __init__(self, kind: str, feature_channels: int, pooled: int, scale: float = 0.25,
                 pixel_dim: int = 0) -> None:
        super().__init__()
        self.scale = scale  # public: brings typical pooled conv2 features (norm ≈ 3–6) to norm ≈ 1
        self.pixel_dim = pixel_dim
        # public: brings typical pixel statistics (Fashion-MNIST: norm ≈ 0.37·√dim) to norm ≈ 1.5
        self.pixel_scale = 4.0 / math.sqrt(pixel_dim) if pixel_dim else 0.0
        if kind not in EMBEDDINGS:
            raise ValueError(f"embedding must be one of {EMBEDDINGS}, got {kind!r}")
        self.kind = kind
        channels = feature_channels if kind == "linear" else 2 * feature_channels
        self.out_shape = (channels, pooled, pooled)
        self.dim = int(math.prod(self.out_shape)) + pixel_dim

    def forward(self, phi: torch.Tensor, pixels: torch.Tensor | None = None) -> torch.Tensor:
        # Second moments of φ itself (not of the scaled φ), so that both blocks carry
        # comparable weight after the common public scale.
        e = phi if self.kind == "linear" else torch.cat([phi, phi * phi], dim=1)
        e = soft_bound(self.scale * e.flatten(1))
        if not self.pixel_dim:
            return e
        if pixels is None:
            raise ValueError("this embedding was built with pixel statistics; pass them")
        return torch.cat([e, soft_bound(self.pixel_scale * pixels.flatten(1))], dim=1) / math.sqrt(2.0)


class Rear(nn.Module):
    """conv3 + FC + class-conditional projection, on normalised group aggregates.

    `class_weights` (μ, K) says which class each (class-pure) group holds: one-hot.
    """

    def __init__(self, in_shape: tuple[int, int, int], num_classes: int, width: int = 64, hidden: int = 256,
                 pixel_dim: int = 0) -> None:
        super().__init__()
        c, s, _ = in_shape
        self.in_shape = in_shape
        self.spatial_dim = c * s * s
        self.conv3 = nn.Conv2d(c, width, 3, padding=1)
        self.fc = nn.Linear(width * s * s, hidden)
        self.pixel_fc = nn.Linear(pixel_dim, hidden) if pixel_dim else None
        self.out = nn.Linear(hidden, 1)
        self.projection = nn.Linear(num_classes, hidden, bias=False)
        nn.init.normal_(self.projection.weight, std=0.02)

    def forward(self, group_means: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        h = group_means[:, :self.spatial_dim].reshape(-1, *self.in_shape)
        h = self.fc(F.leaky_relu(self.conv3(h), 0.2).flatten(1))
        if self.pixel_fc is not None:
            h = h + self.pixel_fc(group_means[:, self.spatial_dim:])
        h = F.leaky_relu(h, 0.2)
        return self.out(h).squeeze(1) + (self.projection(class_weights) * h).sum(1)


class BaselineDiscriminator(nn.Module):
    """The same D without DPAGG, for the DP-SGD GAN baseline: every layer after the
    public conv1 is trained by DP-SGD on per-record losses."""

    def __init__(self, arch: Architecture, in_channels: int, num_classes: int, feature_channels: int = 16,
                 width: int = 64, hidden: int = 256) -> None:
        super().__init__()
        self.pooled = arch.pooled
        self.conv2 = nn.Conv2d(in_channels, feature_channels, 4, stride=2, padding=1)
        self.conv3 = nn.Conv2d(feature_channels, width, 3, padding=1)
        self.fc = nn.Linear(width * arch.pooled ** 2, hidden)
        self.out = nn.Linear(hidden, 1)
        self.projection = nn.Embedding(num_classes, hidden)
        nn.init.normal_(self.projection.weight, std=0.02)

    def forward(self, h1: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        phi = F.adaptive_avg_pool2d(F.leaky_relu(self.conv2(h1), 0.2), self.pooled)
        h = F.leaky_relu(self.conv3(phi), 0.2).flatten(1)
        h = F.leaky_relu(self.fc(h), 0.2)
        return self.out(h).squeeze(1) + (self.projection(labels) * h).sum(1)
