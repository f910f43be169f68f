"""Attention figures in the manner of Show, Attend and Tell: for each generated word, the picture with the region
attention upsampled, smoothed and laid over it, and the word under the panel."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

PANEL_INCHES = 2.4  # side of one panel
DPI = 100
COLUMNS = 5


def attention_overlay(image: Image.Image, attention: np.ndarray, blur: float | None = None) -> np.ndarray:
    """The (S, S) attention as an (H, W) map over the picture: bicubic upsampling, then a Gaussian blur of about a
    third of a cell, normalised to [0, 1]."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms.functional import gaussian_blur

    width, height = image.size
    grid = torch.as_tensor(np.asarray(attention, dtype=np.float32))[None, None]  # (1, 1, S, S)
    upsampled = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False).clamp(min=0)
    sigma = blur if blur is not None else max(width, height) / grid.shape[-1] / 3
    kernel = 2 * math.ceil(3 * sigma) + 1
    # the blur pads by reflection, which needs a kernel radius below each side (1 x 1 or 4000 x 10 pictures)
    kernels = [min(kernel, 2 * width - 1), min(kernel, 2 * height - 1)]
    smooth = gaussian_blur(upsampled, kernels, [sigma, sigma])[0, 0].numpy()  # (H, W)
    return smooth / max(float(smooth.max()), 1e-12)


def plot_attention(
    image: Image.Image,
    words: Sequence[str],
    attentions: Sequence[np.ndarray],
    path: str | os.PathLike | None = None,
    columns: int = COLUMNS,
    boxes: Sequence[Sequence[tuple[float, float, float, float]] | None] | None = None,
):
    """One panel per word (attention over the picture, the word as its caption); saved as PNG when `path` is given.
    `boxes`: per word, the boxes (x0, y0, x1, y1, inclusive picture pixels) of what it names, drawn on its panel.

    The figure is `min(len(words), columns)` panels wide and `ceil(len(words) / columns)` high, 240 pixels each.
    Returns the matplotlib figure.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if len(words) != len(attentions) or (boxes is not None and len(boxes) != len(words)):
        raise ValueError(f"{len(words)} words but {len(attentions)} attention maps"
                         + (f" and {len(boxes)} box lists" if boxes is not None else ""))  # fmt: skip
    if not words:
        raise ValueError("No words to draw: the caption is empty")
    image = image.convert("RGB")
    cols = min(len(words), columns)
    rows = math.ceil(len(words) / cols)
    figure = plt.figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI)
    for index, (word, attention) in enumerate(zip(words, attentions, strict=True)):
        axes = figure.add_subplot(rows, cols, index + 1)
        axes.imshow(image)
        axes.imshow(attention_overlay(image, attention), cmap="gray", alpha=0.6, vmin=0, vmax=1)
        for x0, y0, x1, y1 in (boxes[index] or []) if boxes is not None else []:
            axes.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="yellow",
                                     linewidth=1.5))  # fmt: skip
        axes.set_title(word, fontsize=12, y=-0.14)
        axes.set_axis_off()
    figure.subplots_adjust(left=0.02, right=0.98, top=0.98, bottom=0.1, wspace=0.05, hspace=0.2)
    if path is not None:
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
    return figure
