"""Where a training caption's words should look: the grid cells of the boxes of the phrases they belong to.

Attention supervision (Liu et al., AAAI 2017) needs, for each training caption, a target map per token: the cells
covered by the boxes of the phrase the token is part of, normalised by the model's loss. Phrases come from Flickr30k
Entities (the caption's own phrases, matched to its words by their text) or from the sample set's drawn shapes
(each shape's "colour kind", wherever a caption says it). A phrase that cannot be found in its caption (Flickr30k's
sentence differs slightly from Flickr8k's for some images) is skipped and counted, never an error.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from datasets import Image as ImageFeature
from PIL import Image

from ..attention_measures import cell_centres, cells_inside

logger = logging.getLogger(__name__)

# words of a phrase that get no target: an article looks nowhere in particular ("a" in "a black dog")
UNGROUNDED_WORDS = frozenset({"a", "an", "the"})

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 as fractions of the picture's width and height


@dataclass
class Phrase:
    """A phrase of a caption and the boxes of what it names. `caption` is the caption's index among its image's
    captions, or None when the phrase may appear in any of them (the sample set's shapes)."""

    caption: int | None
    words: tuple[str, ...]
    boxes: list[Box]


def normalised_words(text: str) -> list[str]:
    """Lower-case letters and digits only: how a phrase and a caption's tokenizer words are compared."""
    return re.findall(r"[a-z0-9]+", text.lower())


def entity_phrases(entry: dict) -> list[Phrase]:
    """One image's Flickr30k Entities annotation as phrases with boxes (inclusive pixel boxes of the original picture,
    here as fractions of it); phrases of entities without boxes (scenes, `notvisual`) are left out."""
    width, height = entry["width"], entry["height"]
    phrases = []
    for caption, entity, _, text in entry["phrases"]:
        boxes = entry["boxes"].get(entity)
        words = tuple(normalised_words(text))
        if boxes and words:
            fractions = [(x0 / width, y0 / height, (x1 + 1) / width, (y1 + 1) / height) for x0, y0, x1, y1 in boxes]
            phrases.append(Phrase(int(caption), words, fractions))
    return phrases


def shape_phrases(objects: list[dict], picture_size: tuple[int, int]) -> list[Phrase]:
    """The sample set's shapes as phrases "colour kind", in whichever caption says them."""
    width, height = picture_size
    phrases = []
    for shape in objects:
        x0, y0, x1, y1 = shape["box"]
        box = (x0 / width, y0 / height, (x1 + 1) / width, (y1 + 1) / height)
        phrases.append(Phrase(None, (shape["colour"], shape["kind"]), [box]))
    return phrases


def picture_sizes(dataset) -> list[tuple[int, int]]:
    """(width, height) of every picture of a split, read from the file headers, without decoding the pixels."""
    sizes = []
    for image in dataset.cast_column("image", ImageFeature(decode=False))["image"]:
        source = io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"]
        with Image.open(source) as picture:
            sizes.append(picture.size)
    return sizes


def covered_cells(boxes: list[Box], grid_size: int, picture_size: tuple[int, int], image_processor) -> np.ndarray:
    """(k,) indices of the grid cells whose centres lie inside any of the boxes (fractions of the picture), the cells
    as the model sees them after the image processor's resize and crop; a box too small to hold a cell's centre
    gives the cell nearest to its own centre."""
    width, height = picture_size
    centres = cell_centres(grid_size, picture_size, image_processor)  # (k, 2) in picture pixels
    inside = np.zeros(len(centres), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        # as inclusive pixel boxes, the form `cells_inside` reads (its right edge is x1 + 1)
        in_box = cells_inside([(x0 * width, y0 * height, x1 * width - 1, y1 * height - 1)], centres)
        if not in_box.any():
            middle = [(x0 + x1) / 2 * width, (y0 + y1) / 2 * height]
            in_box[np.argmin(((centres - middle) ** 2).sum(axis=1))] = True
        inside |= in_box
    return np.flatnonzero(inside)


class CaptionWords:
    """One tokenized caption's words (`processor.words_of`: text and piece positions), compared by their letters and
    digits; words with neither (punctuation) are passed over."""

    def __init__(self, words: list[tuple[str, list[int]]]):
        self.words = words
        self.keys = [" ".join(normalised_words(word)) for word, _ in words]
        self.kept = [i for i, key in enumerate(self.keys) if key]
        self.sequence = [self.keys[i] for i in self.kept]

    def occurrences(self, phrase: Phrase) -> list[int]:
        """Where the phrase's words appear, one after another (indices into the kept words)."""
        n = len(phrase.words)
        return [s for s in range(len(self.sequence) - n + 1) if tuple(self.sequence[s : s + n]) == phrase.words]

    def positions(self, start: int, length: int) -> list[int]:
        """The piece positions of `length` kept words from `start`, articles left out."""
        chosen = self.kept[start : start + length]
        return [step for i in chosen if self.keys[i] not in UNGROUNDED_WORDS for step in self.words[i][1]]


def assign_phrases(phrases: list[Phrase], captions: list[CaptionWords]) -> list[list[Phrase]]:
    """The phrases each caption is searched for. Phrases without a caption index go to every caption. The others come
    in groups by the index of the annotation's own sentence, whose order need not be the data set's (Flickr30k's
    five sentences of an image are Flickr8k's five, in another order): each group goes to the caption that contains
    most of its phrases, the best pairs first; a group left without a caption goes nowhere (its phrases count as
    not found)."""
    shared = [p for p in phrases if p.caption is None]
    groups: dict[int, list[Phrase]] = {}
    for phrase in phrases:
        if phrase.caption is not None:
            groups.setdefault(phrase.caption, []).append(phrase)
    pairs = sorted(  # (phrases found, then the same index first, caption i, group j), best first
        (
            (sum(bool(caption.occurrences(p)) for p in group), -abs(i - j), i, j)
            for i, caption in enumerate(captions)
            for j, group in groups.items()
        ),
        reverse=True,
    )
    assigned: list[list[Phrase]] = [list(shared) for _ in captions]
    taken_captions, taken_groups = set(), set()
    for _, _, i, j in pairs:
        if i not in taken_captions and j not in taken_groups:
            assigned[i] += groups[j]
            taken_captions.add(i)
            taken_groups.add(j)
    return assigned


class GroundedCaptions:
    """For each caption of a split (row, caption index): the token positions that name a boxed thing and the grid
    cells it covers, made once from the tokenized captions (`processor.words_of` groups the pieces into words).
    `phrases_of(row, picture size)` gives a picture's phrases.
    `maps(row, caption, length)` gives the caption's (length, k) target map for the collator."""

    def __init__(
        self,
        dataset,
        processor,
        phrases_of: Callable[[int, tuple[int, int]], list[Phrase]],
        grid_size: int,
        max_caption_tokens: int | None = None,
    ):
        self.grid_size = grid_size
        self.targets: dict[tuple[int, int], list[tuple[list[int], np.ndarray]]] = {}
        self.matched = self.unmatched = 0
        sizes = picture_sizes(dataset)
        for row, captions in enumerate(dataset["captions"]):
            phrases = phrases_of(row, sizes[row])
            if not phrases:
                continue
            labels = processor.encode_captions(captions, max_length=max_caption_tokens)
            words = [CaptionWords(processor.words_of(ids)) for ids in labels]
            assigned = assign_phrases(phrases, words)
            self.unmatched += sum(p.caption is not None for p in phrases) - sum(
                p.caption is not None for own in assigned for p in own
            )  # groups left without a caption
            for index, (caption, own) in enumerate(zip(words, assigned, strict=True)):
                found = self.ground(caption, own, sizes[row], processor.image_processor)
                if found:
                    self.targets[(row, index)] = found
        logger.info(
            "Attention supervision: %d phrases with boxes matched to their caption's words, %d not found in the "
            "caption (skipped); %d of %d captions have targets",
            self.matched,
            self.unmatched,
            len(self.targets),
            sum(len(c) for c in dataset["captions"]),
        )

    def ground(self, caption: CaptionWords, phrases: list[Phrase], size, image_processor) -> list:
        """The (token positions, cells) targets of one caption's phrases; counts what matched and what did not."""
        found = []
        for phrase in phrases:
            starts = caption.occurrences(phrase)
            if not starts:
                self.unmatched += phrase.caption is not None  # the shared (sample) phrases are a caption's options
                continue
            self.matched += 1
            cells = covered_cells(phrase.boxes, self.grid_size, size, image_processor)
            found += [(caption.positions(start, len(phrase.words)), cells) for start in starts]
        return found

    def maps(self, row: int, caption: int, length: int) -> torch.Tensor:
        """(length, k) target map of a caption's tokens: 1 on the cells of a token's phrase's boxes (the union where
        phrases overlap), rows of zeros where a token has none."""
        target = torch.zeros(length, self.grid_size**2)
        for positions, cells in self.targets.get((row, caption), ()):
            positions = torch.tensor([p for p in positions if p < length], dtype=torch.long)
            target[positions[:, None], torch.from_numpy(cells)[None, :]] = 1.0
        return target
