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
PREVIEW_PIXELS = round(2 * PANEL_INCHES * DPI)  # the longest side a panel's picture and heat map are drawn at
HEAT_MAP = "gray"  # bright where the word looks, dark elsewhere (Show, Attend and Tell's figures); overlay_image too
HEAT_ALPHA = 0.6


def preview(image: Image.Image, longest_side: int = PREVIEW_PIXELS) -> Image.Image:
    """The picture at most `longest_side` pixels on its longest side: a panel shows no more, and the heat map's cost
    then does not grow with the photo (a 6000 x 4000 one would take seconds per word at full size)."""
    image = image.convert("RGB")
    if max(image.size) <= longest_side:
        return image
    scale = longest_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


def attention_overlay(image: Image.Image, attention: np.ndarray, blur: float | None = None) -> np.ndarray:
    """The (S, S) attention as an (H, W) map over the picture: bicubic upsampling, then a Gaussian blur of about a
    third of a cell (separable: two 1-D passes), normalised to [0, 1]. Draw it over a `preview`, not a full photo."""
    import torch
    import torch.nn.functional as F

    width, height = image.size
    grid = torch.as_tensor(np.asarray(attention, dtype=np.float32))[None, None]  # (1, 1, S, S)
    smooth = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False).clamp(min=0)
    sigma = blur if blur is not None else max(width, height) / grid.shape[-1] / 3
    for dim, side in ((3, width), (2, height)):
        # reflection padding needs a kernel radius below the side (1 x 1 or 4000 x 10 pictures)
        radius = min(math.ceil(3 * sigma), side - 1)
        if radius == 0 or sigma <= 0:
            continue
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
        kernel = (kernel / kernel.sum()).view(1, 1, *((1, -1) if dim == 3 else (-1, 1)))  # (1, 1, 1, K) or (K, 1)
        padding = (radius, radius, 0, 0) if dim == 3 else (0, 0, radius, radius)
        smooth = F.conv2d(F.pad(smooth, padding, mode="reflect"), kernel)  # (1, 1, H, W)
    smooth = smooth[0, 0].numpy()
    return smooth / max(float(smooth.max()), 1e-12)


def overlay_image(
    image: Image.Image, attention: np.ndarray, boxes: Sequence[tuple[float, float, float, float]] | None = None
) -> Image.Image:
    """One word's panel as a picture (the app's view): the `preview`, its heat map composited as the figures draw it
    (HEAT_MAP at HEAT_ALPHA over the picture), and the named thing's `boxes` (picture pixels) in yellow."""
    from PIL import ImageDraw

    small = preview(image)
    heat = attention_overlay(small, attention)[..., None]  # (h, w, 1) in [0, 1]; the grey map is heat itself
    pixels = (1 - HEAT_ALPHA) * np.asarray(small, dtype=np.float32) + HEAT_ALPHA * 255.0 * heat
    shown = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    scale_x, scale_y = small.width / image.width, small.height / image.height
    draw = ImageDraw.Draw(shown)
    for x0, y0, x1, y1 in boxes or []:
        draw.rectangle(
            [x0 * scale_x, y0 * scale_y, (x1 + 1) * scale_x - 1, (y1 + 1) * scale_y - 1], outline=(255, 255, 0), width=2
        )
    return shown


def plot_attention(
    image: Image.Image,
    words: Sequence[str],
    attentions: Sequence[np.ndarray],
    path: str | os.PathLike | None = None,
    columns: int = COLUMNS,
    boxes: Sequence[Sequence[tuple[float, float, float, float]] | None] | None = None,
    sentinel: Sequence[float | None] | None = None,
):
    """One panel per word (attention over the picture, the word as its caption), the caption as the title and a
    colour scale; saved as PNG when `path` is given. `boxes`: per word, the boxes (x0, y0, x1, y1, inclusive picture
    pixels) of what it names, drawn on its panel. `sentinel`: per word, the share of its attention that went to the
    model's visual sentinel rather than the picture (None: no sentinel), written under the word.

    The figure is `min(len(words), columns)` panels wide and `ceil(len(words) / columns)` high, 240 pixels each.
    The picture and its heat maps are drawn from a `preview` in the picture's own pixel coordinates. Returns the
    matplotlib figure; `panel_axes(figure)` are the word panels.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    if len(words) != len(attentions) or any(x is not None and len(x) != len(words) for x in (boxes, sentinel)):
        raise ValueError(
            f"{len(words)} words but {len(attentions)} attention maps"
            + (f" and {len(boxes)} box lists" if boxes is not None else "")
            + (f" and {len(sentinel)} sentinel shares" if sentinel is not None else "")
        )
    if not words:
        raise ValueError("No words to draw: the caption is empty")
    width, height = image.size
    small = preview(image)
    extent = (-0.5, width - 0.5, height - 0.5, -0.5)  # the preview spans the whole picture's pixel coordinates
    cols = min(len(words), columns)
    rows = math.ceil(len(words) / cols)
    figure = plt.figure(figsize=(cols * PANEL_INCHES, rows * PANEL_INCHES), dpi=DPI)
    heat = None
    for index, (word, attention) in enumerate(zip(words, attentions, strict=True)):
        axes = figure.add_subplot(rows, cols, index + 1)
        axes.imshow(small, extent=extent)
        heat = axes.imshow(
            attention_overlay(small, attention), cmap=HEAT_MAP, alpha=HEAT_ALPHA, vmin=0, vmax=1, extent=extent
        )
        for x0, y0, x1, y1 in (boxes[index] or []) if boxes is not None else []:
            axes.add_patch(
                Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0 + 1, y1 - y0 + 1, fill=False, edgecolor="yellow", linewidth=1.5)
            )
        share = sentinel[index] if sentinel is not None else None
        label = word if share is None else f"{word}\n{share:.0%} sentinel"
        axes.set_title(label, fontsize=12 if share is None else 10, y=-0.14 if share is None else -0.22)
        axes.set_axis_off()
    title_room = 0.3 / (rows * PANEL_INCHES)  # a line of title, in figure fractions
    two_lines = sentinel is not None and any(share is not None for share in sentinel)  # word + sentinel share
    label_room = (0.25 if two_lines else 0.0) / (rows * PANEL_INCHES)  # the second line, in figure fractions
    figure.subplots_adjust(
        left=0.02,
        right=0.9,
        top=1 - title_room,
        bottom=0.1 + label_room,
        wspace=0.05,
        hspace=0.35 if two_lines else 0.2,
    )
    figure.suptitle(" ".join(words), fontsize=11, y=1 - title_room / 8, va="top")
    scale = figure.add_axes((0.92, 0.15, 0.015, 0.7 - title_room))
    figure.colorbar(heat, cax=scale).set_label("attention (1 = the word's peak)", fontsize=8)
    scale.tick_params(labelsize=7)
    if path is not None:
        figure.savefig(path, dpi=DPI)
        plt.close(figure)
    return figure


def panel_axes(figure) -> list:
    """The word panels of a `plot_attention` figure (not its colour scale)."""
    return figure.axes[:-1]
