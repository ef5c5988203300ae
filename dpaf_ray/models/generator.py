"""Class-conditional generator. It never sees private data (DESIGN §2)."""
from __future__ import annotations

import torch
from torch import nn

from .architecture import Architecture


class ConditionalGenerator(nn.Module):
    """DCGAN-style upsampling generator; GroupNorm (per-sample) so sharding the
    generated batch over workers does not change any sample."""

    def __init__(self, arch: Architecture, num_classes: int, z_dim: int = 64) -> None:
        super().__init__()
        self.arch, self.num_classes, self.z_dim = arch, num_classes, z_dim
        w = arch.gen_width
        self.label_embedding = nn.Embedding(num_classes, z_dim)
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

    def forward(self, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = torch.cat([z, self.label_embedding(labels)], dim=1)
        h = self.stem(h).view(z.shape[0], -1, self.arch.gen_start, self.arch.gen_start)
        return torch.tanh(self.to_image(self.blocks(h)))
