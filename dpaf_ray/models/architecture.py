"""Which network widths and depths go with which image shape."""
from __future__ import annotations

import math
from dataclasses import dataclass

SUPPORTED_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 28, 28), (3, 32, 32), (3, 64, 64), (3, 128, 128))


@dataclass(frozen=True)
class Architecture:
    channels: int
    size: int
    gen_start: int  # spatial size of the generator's first feature map
    gen_blocks: int  # ×2 upsampling blocks
    gen_width: int
    fixed_stages: int  # public conv1 stages (stride 2 each)
    fixed_width: int
    pooled: int = 4  # DPAGG feature map is (feature_channels, pooled, pooled)

    @property
    def pixel_pooled(self) -> int:
        """Grid of the public window statistics: fine for grayscale, at most 2·C·r² ≈ 400 values."""
        return 14 if self.size == 28 else 8


def architecture_for(shape: tuple[int, int, int]) -> Architecture:
    """Deeper generator and more fixed (public) downsampling as the resolution grows."""
    c, h, w = shape
    if (c, h, w) not in SUPPORTED_SHAPES:
        raise ValueError(
            f"image shape {shape} is not supported; supported (C, H, W): {list(SUPPORTED_SHAPES)}. "
            "Resize or convert the images first (e.g. 28×28 grayscale, or 32/64/128 RGB)"
        )
    if h == 28:
        return Architecture(c, h, gen_start=7, gen_blocks=2, gen_width=64, fixed_stages=1, fixed_width=32)
    blocks = int(math.log2(h // 4))
    stages = max(1, int(math.log2(h // 16)))
    return Architecture(c, h, gen_start=4, gen_blocks=blocks, gen_width=min(512, 64 * 2 ** (blocks - 2)),
                        fixed_stages=stages, fixed_width=32)
