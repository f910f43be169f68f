"""Where the attention goes while a caption is written, measured against boxes of the things the captions name.

One code path serves the sample set's drawn shapes (`objects`: kind, colour, box) and real photos with Flickr30k
Entities boxes (phrase -> entity -> boxes; `load_flickr30k_entities`). Both become, per image, a list of
`NamedRegion`s: the words that name a thing, optional qualifiers that tell two of them apart, and its boxes in the
picture's pixels. For every generated word that names a region with boxes:
- pointing: the most-attended grid cell's centre lies inside one of its boxes;
- attention in the boxes: the attention weight on the cells whose centres lie inside them;
- their chance level: the share of cells whose centres lie inside them (what a uniform or random look gets).
For every generated word: the attention's normalised entropy (1 = uniform over the cells, 0 = one cell), and for
consecutive words whether the most-attended cell moves. With a visual sentinel: the mean share of attention it takes,
on the words that name a boxed thing and on the others (a model that knows when to look gives the first less).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .inference import WordAttention

ENTITIES_FILE = "flickr30k_entities.json"  # the shared Flickr8k folder's name for its Flickr30k Entities boxes


@dataclass
class NamedRegion:
    """A thing in a picture that a caption may name: `names` (head nouns), `qualifiers` (words that may come just
    before the name and tell two of a kind apart, e.g. a colour), `boxes` (x0, y0, x1, y1) in picture pixels,
    inclusive."""

    names: set[str]
    boxes: list[tuple[float, float, float, float]]
    qualifiers: set[str] = field(default_factory=set)


def cell_centres(grid_size: int, image_size: tuple[int, int], image_processor) -> np.ndarray:
    """(k, 2) centres (x, y) of the k = S x S grid cells in the original picture's pixels (undoing the processor's
    resize and centre crop)."""
    width, height = image_size
    shortest = image_processor.size.get("shortest_edge") if image_processor.do_resize else None
    scale = shortest / min(width, height) if shortest else 1.0
    resized_w, resized_h = width * scale, height * scale
    crop_h = image_processor.crop_size["height"] if image_processor.do_center_crop else resized_h
    crop_w = image_processor.crop_size["width"] if image_processor.do_center_crop else resized_w
    left, top = (resized_w - crop_w) / 2, (resized_h - crop_h) / 2
    rows, columns = np.divmod(np.arange(grid_size * grid_size), grid_size)
    x = left + (columns + 0.5) * crop_w / grid_size
    y = top + (rows + 0.5) * crop_h / grid_size
    return np.stack([x / scale, y / scale], axis=1)


def cells_inside(boxes, centres: np.ndarray) -> np.ndarray:
    """(k,) whether each cell's centre lies inside any of the inclusive pixel boxes (a pixel spans [x, x + 1))."""
    inside = np.zeros(len(centres), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        inside |= (centres[:, 0] >= x0) & (centres[:, 0] <= x1 + 1) & (centres[:, 1] >= y0) & (centres[:, 1] <= y1 + 1)
    return inside


def named_boxes(regions: list[NamedRegion], words: list[WordAttention], index: int) -> list[tuple] | None:
    """The boxes of what word `index` names: the regions with that name (narrowed by the word before it when that
    is a qualifier of some of them), all their boxes together; None when it names nothing with boxes."""
    word = words[index].word.lower()
    candidates = [r for r in regions if word in r.names and r.boxes]
    if len(candidates) > 1 and index > 0:
        qualified = [r for r in candidates if words[index - 1].word.lower() in r.qualifiers]
        candidates = qualified or candidates
    return [box for region in candidates for box in region.boxes] or None


class AttentionMeasures:
    """Accumulates the measures caption by caption; `generate_captions(on_attention=...)` calls it with each image's
    row and words, so a split's maps are never held. `regions_of(row)` gives that image's named regions and its
    picture size (width, height); `result()` gives the rates."""

    def __init__(
        self, regions_of: Callable[[int], tuple[list[NamedRegion], tuple[int, int]]], grid_size: int, image_processor
    ):
        self.regions_of, self.grid_size, self.image_processor = regions_of, grid_size, image_processor
        self.named_words, self.hits, self.mass, self.chance = 0, 0, 0.0, 0.0
        self.words, self.entropy, self.pairs, self.moves = 0, 0.0, 0, 0
        self.sentinel = {"named": [0.0, 0], "other": [0.0, 0]}  # sum of shares, words

    def __call__(self, row: int, words: list[WordAttention]) -> None:
        regions, image_size = self.regions_of(row)
        centres = cell_centres(self.grid_size, image_size, self.image_processor)
        log_cells = np.log(self.grid_size * self.grid_size)
        previous_peak = None
        for index, item in enumerate(words):
            weights = item.attention.reshape(-1).astype(np.float64)
            weights = weights / weights.sum()
            peak = int(np.argmax(weights))
            positive = weights[weights > 0]
            self.entropy += float(-(positive * np.log(positive)).sum() / log_cells)
            self.words += 1
            if previous_peak is not None:
                self.pairs += 1
                self.moves += peak != previous_peak
            previous_peak = peak
            boxes = named_boxes(regions, words, index)
            if item.sentinel is not None:
                share = self.sentinel["other" if boxes is None else "named"]
                share[0] += item.sentinel
                share[1] += 1
            if boxes is None:
                continue
            inside = cells_inside(boxes, centres)
            self.named_words += 1
            self.hits += bool(inside[peak])
            self.mass += float(weights[inside].sum())
            self.chance += float(inside.mean())

    def mean_sentinel_share(self, words: str) -> float | None:
        total, count = self.sentinel[words]
        return total / count if count else None

    def result(self) -> dict:
        """The rates; those without anything to measure are None (said, rather than a made-up rate)."""
        named = self.named_words or None
        return {
            "pointing_accuracy": self.hits / named if named else None,
            "attention_in_boxes": self.mass / named if named else None,
            "pointing_chance": self.chance / named if named else None,  # also the chance level of the mass
            "pointing_nouns": self.named_words,
            "normalised_entropy": self.entropy / self.words if self.words else None,
            "peak_moves": self.moves / self.pairs if self.pairs else None,
            "words": self.words,
            "sentinel_share_named": self.mean_sentinel_share("named"),
            "sentinel_share_other": self.mean_sentinel_share("other"),
        }


def shape_regions(dataset) -> Callable[[int], tuple[list[NamedRegion], tuple[int, int]]]:
    """`regions_of` for the sample set: each drawn shape is named by its kind and qualified by its colour."""
    rows = dataset.select_columns(["image", "objects"])  # one row decoded at a time

    def regions_of(row: int):
        example = rows[row]
        regions = [NamedRegion({o["kind"]}, [tuple(o["box"])], {o["colour"]}) for o in example["objects"]]
        return regions, example["image"].size

    return regions_of


def head_noun(phrase: str) -> str | None:
    """The last word of a noun phrase, lower-cased ("A little girl" -> "girl"), which heads most English noun
    phrases; None when the phrase has no word."""
    words = re.findall(r"[a-z]+", phrase.lower())
    return words[-1] if words else None


def find_entities_file(data: str, given: str | None) -> str | None:
    """The Flickr30k Entities file to use: the one given, else `ENTITIES_FILE` in the data folder when it is there."""
    if given is None and Path(data, ENTITIES_FILE).is_file():
        return str(Path(data, ENTITIES_FILE))
    return given


def load_flickr30k_entities(path: str | os.PathLike) -> dict[str, dict]:
    """Flickr30k Entities annotations as the shared Flickr8k folder's `flickr30k_entities.json` holds them: per
    image file name, the original `width`/`height`, `boxes` {entity id: [[x0, y0, x1, y1], ...]} and `phrases`
    [[caption index, entity id, type, text], ...]. Keyed here by the image id (the file name without extension),
    as the loaders name images."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such Flickr30k Entities file")
    try:
        annotations = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not a JSON file of Flickr30k Entities annotations ({error})") from None
    if not isinstance(annotations, dict) or not all(
        {"width", "height", "boxes", "phrases"} <= set(a) for a in annotations.values()
    ):
        raise ValueError(f"{path}: expected {{image file: {{width, height, boxes, phrases}}}} per image")
    return {Path(name).stem: entry for name, entry in annotations.items()}


def picture_regions(entry: dict, picture_size: tuple[int, int]) -> list[NamedRegion]:
    """One image's Flickr30k Entities annotation as named regions of the picture as loaded: each boxed entity named by
    the head nouns of the phrases that refer to it in any of the image's captions, its boxes scaled from the original
    picture's size (the shared Flickr8k copies are squashed to 224 x 224)."""
    width, height = picture_size
    sx, sy = width / entry["width"], height / entry["height"]
    names: dict[str, set[str]] = {}
    for _, entity, _, text in entry["phrases"]:
        noun = head_noun(text)
        if noun and entry["boxes"].get(entity):
            names.setdefault(entity, set()).add(noun)
    # inclusive pixel boxes: pixel x spans [x, x + 1), so the right edge x1 + 1 scales to (x1 + 1) * sx
    return [
        NamedRegion(
            nouns,
            [(x0 * sx, y0 * sy, (x1 + 1) * sx - 1, (y1 + 1) * sy - 1) for x0, y0, x1, y1 in entry["boxes"][entity]],
        )
        for entity, nouns in names.items()
    ]


def entity_regions(entities: dict[str, dict], dataset) -> Callable[[int], tuple[list[NamedRegion], tuple[int, int]]]:
    """`regions_of` for photos with Flickr30k Entities annotations (`load_flickr30k_entities`), by image id."""
    rows = dataset.select_columns(["image", "image_id"])

    def regions_of(row: int):
        example = rows[row]
        entry = entities.get(example["image_id"])
        size = example["image"].size
        return (picture_regions(entry, size) if entry is not None else []), size

    return regions_of
