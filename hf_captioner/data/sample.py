"""The sample data set: drawn pictures of one or two shapes, each with several differently worded captions.

Every noun in a caption names a shape in the picture, and every shape's box is stored, so a model trained on it can
be checked for where it looks. Deterministic from the seed; a few thousand pictures are drawn in seconds.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .loaders import SAMPLE_FILE

KINDS = ("circle", "square", "triangle", "star")
COLOURS = {
    "red": (215, 40, 40),
    "green": (35, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 195, 30),
    "purple": (135, 55, 175),
}
SIZES = {"small": 0.24, "large": 0.42}  # side of the shape's box, as a fraction of the picture side
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
BACKGROUND = (232, 232, 228)
SAMPLE_SPLITS = ("train", "validation", "test")


@dataclass
class Shape:
    kind: str
    colour: str
    size: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, inclusive of the shape's outermost pixels

    def phrase(self, rng: random.Random, with_size: bool = False) -> str:
        size = f"{rng.choice(SIZE_WORDS[self.size])} " if with_size else ""
        return f"a {size}{self.colour} {self.kind}"


def _draw_mask(kind: str, box: tuple[int, int, int, int], image_size: int) -> np.ndarray:
    """The pixels a shape covers, as a boolean (H, W) mask."""
    layer = Image.new("L", (image_size, image_size), 0)
    draw, fill = ImageDraw.Draw(layer), 255
    x0, y0, x1, y1 = box
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # a five-pointed star
        cx, cy, outer = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
        points = []
        for i in range(10):
            radius = outer if i % 2 == 0 else outer * 0.45
            angle = -np.pi / 2 + i * np.pi / 5
            points.append((cx + radius * np.cos(angle), cy + radius * np.sin(angle)))
        draw.polygon(points, fill=fill)
    return np.asarray(layer) > 0


def _tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())


def _where(shape: Shape, image_size: int) -> str:
    """Where a lone shape sits, from its centre."""
    x0, y0, x1, y1 = shape.box
    cx, cy = (x0 + x1) / 2 / image_size, (y0 + y1) / 2 / image_size
    if abs(cx - 0.5) < 0.12 and abs(cy - 0.5) < 0.12:
        return "in the middle"
    if abs(cx - 0.5) >= abs(cy - 0.5):
        return "on the left" if cx < 0.5 else "on the right"
    return "at the top" if cy < 0.5 else "at the bottom"


def _captions(shapes: list[Shape], layout: str, image_size: int, rng: random.Random) -> list[str]:
    if len(shapes) == 1:
        (shape,) = shapes
        where = _where(shape, image_size)
        captions = [
            shape.phrase(rng),
            shape.phrase(rng, with_size=True),
            f"{shape.phrase(rng)} {where}",
            f"there is {shape.phrase(rng, with_size=True)} {where}",
            f"{shape.phrase(rng, with_size=True)} {where}",
            f"a single {shape.colour} {shape.kind}",
        ]
    else:
        first, second = shapes  # first is left of (or above) second
        before, after = ("to the left of", "to the right of") if layout == "horizontal" else ("above", "below")
        captions = [
            f"{first.phrase(rng)} and {second.phrase(rng)}",
            f"{first.phrase(rng)} {before} {second.phrase(rng)}",
            f"{second.phrase(rng)} {after} {first.phrase(rng)}",
            f"{first.phrase(rng, True)} next to {second.phrase(rng, True)}",
            f"there is {second.phrase(rng, True)} {after} {first.phrase(rng)}",
            f"{second.phrase(rng)} beside {first.phrase(rng, True)}",
        ]
    return list(dict.fromkeys(captions))


def draw_scene(rng: random.Random, image_size: int = 64) -> tuple[Image.Image, list[str], list[Shape]]:
    """One picture, its captions and its shapes (boxes fitted to the drawn pixels)."""
    count = rng.choice((1, 2))
    layout = rng.choice(("horizontal", "vertical"))
    colours = rng.sample(sorted(COLOURS), count)
    shapes = []
    for i in range(count):
        side = int(SIZES[size := rng.choice(sorted(SIZES))] * image_size)
        margin = 2
        if count == 1:
            x0 = rng.randint(margin, image_size - side - margin)
            y0 = rng.randint(margin, image_size - side - margin)
        else:  # each shape in its own half, along the layout's axis
            half = image_size // 2
            along = (
                rng.randint(i * half + margin, (i + 1) * half - side - margin) if side < half - 2 * margin else i * half
            )
            across = rng.randint(margin, image_size - side - margin)
            x0, y0 = (along, across) if layout == "horizontal" else (across, along)
        shapes.append(Shape(rng.choice(KINDS), colours[i], size, (x0, y0, x0 + side, y0 + side)))

    pixels = np.empty((image_size, image_size, 3), dtype=np.float64)
    pixels[:] = BACKGROUND
    for shape in shapes:
        mask = _draw_mask(shape.kind, shape.box, image_size)
        pixels[mask] = COLOURS[shape.colour]
        shape.box = _tight_box(mask)
    pixels += np.random.default_rng(rng.getrandbits(32)).normal(0, 4, pixels.shape)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels), _captions(shapes, layout, image_size, rng), shapes


def sample_records(n_train: int, n_val: int, n_test: int, seed: int = 0, image_size: int = 64) -> list[dict]:
    """Rows of the sample data set, in split order: image, captions, image_id, split and objects."""
    rng = random.Random(seed)
    records = []
    for split, count in zip(SAMPLE_SPLITS, (n_train, n_val, n_test), strict=True):
        for i in range(count):
            image, captions, shapes = draw_scene(rng, image_size)
            records.append(
                {
                    "image": image,
                    "captions": captions,
                    "image_id": f"sample-{split}-{i:05d}",
                    "split": split,
                    "objects": [asdict(s) | {"box": list(s.box)} for s in shapes],
                }
            )
    return records


def make_sample_dataset(n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0, image_size: int = 64):
    """The sample data set as a `DatasetDict` (train / validation / test) in the project's schema, plus `objects`."""
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    features = Features(
        {
            "image": Image(),
            "captions": Sequence(Value("string")),
            "image_id": Value("string"),
            "objects": [
                {
                    "kind": Value("string"),
                    "colour": Value("string"),
                    "size": Value("string"),
                    "box": Sequence(Value("int32"), length=4),
                }
            ],
        }
    )
    records = sample_records(n_train, n_val, n_test, seed, image_size)
    splits = {}
    for split in SAMPLE_SPLITS:
        rows = [{k: v for k, v in r.items() if k != "split"} for r in records if r["split"] == split]
        columns = {name: [row[name] for row in rows] for name in features}
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def write_sample_dataset(
    folder: str | Path, n_train: int = 2000, n_val: int = 200, n_test: int = 200, seed: int = 0, image_size: int = 64
) -> Path:
    """Write the sample data set as an image folder + Karpathy-style `dataset_sample.json` (with each picture's
    shapes and boxes under `objects`), so it goes through the same loader as Flickr data."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    karpathy_split = {"train": "train", "validation": "val", "test": "test"}
    entries = []
    for number, record in enumerate(sample_records(n_train, n_val, n_test, seed, image_size)):
        filename = f"{record['image_id']}.png"
        record["image"].save(folder / "images" / filename)
        entries.append(
            {
                "filename": filename,
                "imgid": number,
                "split": karpathy_split[record["split"]],
                "sentences": [{"raw": c, "tokens": c.split()} for c in record["captions"]],
                "objects": record["objects"],
            }
        )
    path = folder / SAMPLE_FILE
    path.write_text(json.dumps({"dataset": "sample", "images": entries}))
    return path
