"""Evaluate a saved captioner on a data split: captions, COCO metrics, and (with shape boxes) where attention points.

`hf-captioner evaluate` is the command line; `evaluate_split` is the same for notebooks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from .inference import WordAttention, generate_captions
from .metrics import score_captions

logger = logging.getLogger(__name__)


def grid_cell_to_image_point(
    cell: int, grid_size: int, image_size: tuple[int, int], image_processor
) -> tuple[float, float]:
    """Centre of grid cell `cell` in the original picture's pixels (undoing the resize and the centre crop)."""
    width, height = image_size
    shortest = image_processor.size.get("shortest_edge") if image_processor.do_resize else None
    scale = shortest / min(width, height) if shortest else 1.0
    resized_w, resized_h = width * scale, height * scale
    crop_h = image_processor.crop_size["height"] if image_processor.do_center_crop else resized_h
    crop_w = image_processor.crop_size["width"] if image_processor.do_center_crop else resized_w
    left, top = (resized_w - crop_w) / 2, (resized_h - crop_h) / 2
    row, column = divmod(cell, grid_size)
    x = left + (column + 0.5) * crop_w / grid_size
    y = top + (row + 0.5) * crop_h / grid_size
    return x / scale, y / scale


class PointingAccuracy:
    """How often the most-attended region, while a shape's noun is emitted, lies in that shape's box — and chance.

    Called as `on_attention(row, words)` by `generate_captions`, image by image, on a data set with `objects` (kind,
    colour, box), such as the sample data set; `result()` gives the rates. A noun is matched to the shape of its kind
    (and, where two share the kind, of the colour named just before it); chance is the box's share of the picture,
    averaged over the same nouns.
    """

    def __init__(self, dataset, grid_size: int, image_processor):
        self.dataset = dataset.select_columns(["image", "objects"])  # one row decoded at a time
        self.grid_size, self.image_processor = grid_size, image_processor
        self.hits, self.chance, self.nouns = 0, 0.0, 0

    def __call__(self, row: int, words: list[WordAttention]) -> None:
        example = self.dataset[row]
        image, objects = example["image"], example["objects"]
        for index, item in enumerate(words):
            candidates = [o for o in objects if o["kind"] == item.word]
            if len(candidates) > 1 and index > 0:
                candidates = [o for o in candidates if o["colour"] == words[index - 1].word]
            if len(candidates) != 1:
                continue
            x0, y0, x1, y1 = candidates[0]["box"]
            cell = int(np.argmax(item.attention))
            x, y = grid_cell_to_image_point(cell, self.grid_size, image.size, self.image_processor)
            self.hits += x0 <= x <= x1 + 1 and y0 <= y <= y1 + 1
            self.chance += (x1 - x0 + 1) * (y1 - y0 + 1) / (image.size[0] * image.size[1])
            self.nouns += 1

    def result(self) -> dict:
        if self.nouns == 0:  # no caption named a shape: nothing to measure, and said so rather than a made-up rate
            return {"pointing_accuracy": None, "pointing_chance": None, "pointing_nouns": 0}
        return {"pointing_accuracy": self.hits / self.nouns, "pointing_chance": self.chance / self.nouns,
                "pointing_nouns": self.nouns}  # fmt: skip


def evaluate_split(
    model,
    processor,
    dataset,
    output_dir: str | os.PathLike,
    split: str,
    num_beams: int = 3,
    batch_size: int = 32,
    max_new_tokens: int = 30,
    meteor: bool = True,
    extra: dict | None = None,
) -> dict:
    """Caption every image of `dataset`, score against its references, write predictions.jsonl and metrics.json.
    With shape boxes (`objects`), the same captioning pass also measures where attention points."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    pointing = None
    if "objects" in dataset.column_names:
        pointing = PointingAccuracy(dataset, model.config.grid_size, processor.image_processor)
    captions = generate_captions(model, processor, dataset, batch_size=batch_size, on_attention=pointing,
                                 num_beams=num_beams, max_new_tokens=max_new_tokens)  # fmt: skip
    references = dataset["captions"]
    with open(output_dir / "predictions.jsonl", "w", encoding="utf-8") as handle:
        for image_id, caption, refs in zip(dataset["image_id"], captions, references, strict=True):
            handle.write(json.dumps({"image_id": image_id, "caption": caption, "references": refs}) + "\n")
    scores = score_captions(captions, references, meteor=meteor)
    metrics = {
        "split": split,
        "num_beams": num_beams,
        "max_new_tokens": max_new_tokens,
        "images": len(dataset),
        "references": sum(len(r) for r in references),
        "empty_captions": sum(1 for c in captions if not c),
        "metrics": scores,
        **(extra or {}),
    }
    if pointing is not None:
        metrics["attention"] = pointing.result()
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(metrics: dict) -> str:
    """The scores as a small Markdown table (x100, as papers report them; CIDEr-D too)."""
    scores = metrics["metrics"]
    names = {"bleu_1": "BLEU-1", "bleu_2": "BLEU-2", "bleu_3": "BLEU-3", "bleu_4": "BLEU-4", "meteor": "METEOR",
             "rouge_l": "ROUGE-L", "cider": "CIDEr-D"}  # fmt: skip
    header = "| split | beams | " + " | ".join(names[k] for k in names if k in scores) + " |"
    rule = "|" + "---|" * (2 + sum(k in scores for k in names))
    values = (
        f"| {metrics['split']} | {metrics['num_beams']} | "
        + " | ".join(f"{100 * scores[k]:.1f}" for k in names if k in scores)
        + " |"
    )
    lines = [header, rule, values]
    if metrics.get("attention", {}).get("pointing_nouns"):
        a = metrics["attention"]
        lines.append(f"\nPointing accuracy {100 * a['pointing_accuracy']:.1f}% over {a['pointing_nouns']} nouns "
                     f"(chance {100 * a['pointing_chance']:.1f}%)")  # fmt: skip
    return "\n".join(lines)
