"""The in-memory image data set every other module consumes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch


class DataError(ValueError):
    """Bad or missing input data; the message names the problem and the fix."""


@dataclass
class ImageDataset:
    """Images as uint8 tensors (N, C, H, W) and integer labels in [0, num_classes).

    Kept as uint8 so that 60k images cost 47 MB, not 188 MB; `as_float` converts
    to the [-1, 1] range the models use.

    `class_names[k]` names label k where the user named the classes (the sorted sub-folder names of
    an image folder, or a Parquet table's metadata); None where they are unknown. The names are
    public facts the user supplies (docs/design.md rule 15): they travel into `release/`.
    """

    images: torch.Tensor = field(repr=False)  # uint8, (N, C, H, W)
    labels: torch.Tensor = field(repr=False)  # int64, (N,)
    num_classes: int
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(
                f"{self.name}: images must be a uint8 tensor (N, C, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(
                f"{self.name}: {self.images.shape[0]} images but labels of shape "
                f"{tuple(self.labels.shape)}; give exactly one label per image"
            )
        self.labels = self.labels.to(torch.int64)
        self.class_names = check_class_names(self.class_names, self.num_classes, self.name)
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise DataError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), found "
                f"[{int(self.labels.min())}, {int(self.labels.max())}]; relabel the classes as 0..K-1"
            )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def as_float(self, index: torch.Tensor | slice | None = None) -> torch.Tensor:
        x = self.images if index is None else self.images[index]
        return x.to(torch.float32).div_(127.5).sub_(1.0)

    def subset(self, index: torch.Tensor, name: str | None = None) -> "ImageDataset":
        return ImageDataset(self.images[index], self.labels[index], self.num_classes, name or self.name,
                            self.class_names)


def check_class_names(names: Sequence[str] | None, num_classes: int, where: str) -> tuple[str, ...] | None:
    """`names` as a tuple of one distinct, non-empty name per class, or None when not given."""
    if names is None:
        return None
    names = tuple(names)
    if len(names) != num_classes or not all(isinstance(n, str) and n.strip() for n in names):
        raise DataError(f"{where}: {len(names)} class names for {num_classes} classes; give one non-empty name "
                        f"per class, label k named by the k-th ({list(names)[:12]})")
    if len(set(names)) != len(names):
        raise DataError(f"{where}: class names {list(names)} repeat a name; each class needs its own name")
    return names
