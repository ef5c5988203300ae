"""Pictures for a human reviewer: a class-by-class sample grid and training curves.

Mode collapse and class confusion are easier to see than to measure, so every run saves both.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

#: Pixels between tiles (torchvision's make_grid padding).
GRID_PADDING = 2
#: Width of the left margin holding the class index of each row (wider where rows carry class names).
LABEL_MARGIN = 28
#: A class name longer than this is cut, so one long folder name cannot widen the grid without bound.
MAX_NAME_CHARS = 24


def row_labels(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """The text left of each row: the label, and its class name where the classes are named."""
    if class_names is None:
        return [str(k) for k in range(num_classes)]
    if len(class_names) != num_classes:
        raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
    return [f"{k} {n if len(n) <= MAX_NAME_CHARS else n[:MAX_NAME_CHARS - 1] + '~'}"
            for k, n in enumerate(class_names)]


def label_margin(num_classes: int, class_names: Sequence[str] | None = None) -> int:
    """Pixels left of the tiles: LABEL_MARGIN, or the widest row label plus a gap."""
    if class_names is None:
        return LABEL_MARGIN
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widest = max(draw.textlength(_drawable(t, draw)) for t in row_labels(num_classes, class_names))
    return max(LABEL_MARGIN, math.ceil(widest) + 8)


def _drawable(text: str, draw: ImageDraw.ImageDraw) -> str:
    """`text`, or its ASCII escape where the font cannot encode it (Pillow's bitmap fallback font)."""
    try:
        draw.textlength(text)
        return text
    except UnicodeEncodeError:
        return text.encode("ascii", "backslashreplace").decode()


def _to_unit_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] -> float [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div(255.0)
    return images.detach().float().add(1.0).div(2.0).clamp(0.0, 1.0)


def grid_size(num_classes: int, per_class: int, image_hw: tuple[int, int],
              class_names: Sequence[str] | None = None) -> tuple[int, int]:
    """(width, height) in pixels of the PNG `save_sample_grid` writes."""
    h, w = image_hw
    width = label_margin(num_classes, class_names) + per_class * (w + GRID_PADDING) + GRID_PADDING
    height = num_classes * (h + GRID_PADDING) + GRID_PADDING
    return width, height


def save_sample_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    path: str | os.PathLike,
    per_class: int = 10,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write a PNG with one row per class (class index, and name where given, on the left),
    `per_class` tiles per row.

    Takes the first `per_class` images of each class; rows with fewer are padded with blank
    tiles, so a missing class shows up as an empty row. Returns the path written.
    """
    if images.dim() != 4:
        raise ValueError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{images.shape[0]} images but labels of shape {tuple(labels.shape)}")
    if per_class < 1 or num_classes < 1:
        raise ValueError("per_class and num_classes must be >= 1")
    _, c, h, w = images.shape
    x = _to_unit_range(images.cpu())
    labels = labels.cpu().long()
    tiles = torch.zeros(num_classes * per_class, c, h, w)
    for k in range(num_classes):
        chosen = x[labels == k][:per_class]
        tiles[k * per_class : k * per_class + len(chosen)] = chosen
    grid = make_grid(tiles, nrow=per_class, padding=GRID_PADDING, pad_value=0.5)
    array = grid.mul(255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    body = Image.fromarray(array, mode="RGB")

    margin = label_margin(num_classes, class_names)
    canvas = Image.new("RGB", (margin + body.width, body.height), (255, 255, 255))
    canvas.paste(body, (margin, 0))
    draw = ImageDraw.Draw(canvas)
    for k, text in enumerate(row_labels(num_classes, class_names)):
        y_mid = GRID_PADDING + k * (h + GRID_PADDING) + h // 2
        draw.text((margin - 4, y_mid), _drawable(text, draw), fill=(0, 0, 0), anchor="rm")
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out, format="PNG")
    return out


def save_curves(
    history: dict[str, list[float]], path: str | os.PathLike, x_key: str = "iteration"
) -> Path:
    """Write a PNG with one subplot per series in `history` (losses, epsilon, ...).

    `history[x_key]` is the shared x axis when present; a series whose length differs from it
    (e.g. logged less often) is plotted against its own index. Uses the Agg canvas directly, so
    it never touches pyplot's global state or needs a display.
    """
    xs = history.get(x_key)
    series = {k: v for k, v in history.items() if k != x_key and len(v) > 0}
    if not series:
        raise ValueError(f"history has no series to plot besides {x_key!r}: {list(history)}")
    n = len(series)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.0 * cols, 3.0 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, (name, values) in enumerate(series.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        if xs is not None and len(xs) == len(values):
            ax.plot(list(xs), list(values))
            ax.set_xlabel(x_key)
        else:
            ax.plot(range(len(values)), list(values))
            ax.set_xlabel("index")
        ax.set_title(name)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
