"""Evaluate a saved captioner on a data split: captions, COCO metrics, and (with shape boxes) where attention points.

`scripts/evaluate.py` is the command line; `evaluate_split` is the same for notebooks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .metrics import score_captions
from .training import generate_captions

logger = logging.getLogger(__name__)


def speed_options(model, bf16: bool = False, channels_last: bool = False, compile_step: bool = False):
    """Apply the inference speed options that `scripts/benchmark.py` measures, and return the context to caption in.

    channels_last: the encoder's convolutions in NHWC layout; bf16: autocast matrix products to bfloat16 (captions
    change slightly: see the README); compile_step: `torch.compile` the decoder step (dynamic shapes; slow first call).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_step:
        model.decoder.step = torch.compile(model.decoder.step, dynamic=True)
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)


def add_speed_arguments(parser) -> None:
    """The `speed_options` flags, for the scripts that caption."""
    parser.add_argument(
        "--bf16", action="store_true", help="autocast to bfloat16 (faster on CPUs with AVX512-BF16/AMX)"
    )
    parser.add_argument("--channels_last", action="store_true", help="NHWC convolutions in the encoder")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder step")


@dataclass
class WordAttention:
    """One generated word and the attention over the S x S grid while it was emitted (mean over its pieces)."""

    word: str
    attention: np.ndarray  # (S, S)


@torch.no_grad()
def word_attention(model, processor, pixel_values: torch.Tensor, sequences: torch.Tensor) -> list[list[WordAttention]]:
    """Per image, its generated words with their attention maps.

    The captions are fed back through the model (teacher forcing reproduces decoding exactly), so this works for
    any decoding method: position t of `cross_attentions` is where the model looked while emitting token t + 1.
    """
    config = model.config
    inputs = sequences[:, :-1]
    targets = sequences[:, 1:]
    outputs = model(pixel_values=pixel_values.to(model.device), decoder_input_ids=inputs.to(model.device),
                    output_attentions=True)  # fmt: skip
    maps = outputs.cross_attentions.float().cpu().view(*targets.shape, config.grid_size, config.grid_size)
    special = {config.pad_token_id, config.bos_token_id, config.eos_token_id}
    tokenizer = processor.tokenizer
    results = []
    for row, ids in enumerate(targets.tolist()):
        words: list[tuple[str, list[int]]] = []
        for step, token_id in enumerate(ids):
            if token_id in special:
                if token_id == config.eos_token_id:
                    break
                continue
            piece = tokenizer.convert_ids_to_tokens(token_id)
            if piece.startswith("▁") or not words:
                words.append((piece.lstrip("▁"), [step]))
            else:
                words[-1] = (words[-1][0] + piece, words[-1][1] + [step])
        results.append([WordAttention(w, maps[row, steps].mean(0).numpy()) for w, steps in words if w])
    return results


@torch.no_grad()
def caption_with_attention(
    model, processor, images, attention: bool = True, **generate_kwargs
) -> tuple[list[str], list[list[WordAttention]] | None]:
    """Caption a batch of pictures and return, per picture, its words with the attention map of each (None when
    `attention` is off: the maps cost a second pass through the model)."""
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.device)
    sequences = model.generate(pixel_values=pixel_values, **generate_kwargs)
    maps = word_attention(model, processor, pixel_values, sequences) if attention else None
    return processor.batch_decode(sequences), maps


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


def pointing_accuracy(model, processor, dataset, num_beams: int = 1, batch_size: int = 50) -> dict:
    """How often the most-attended region, while a shape's noun is emitted, lies in that shape's box — and chance.

    Needs a data set with `objects` (kind, colour, box), such as the sample data set. A noun is matched to the shape
    of its kind (and, where two share the kind, of the colour named just before it); chance is the box's share of
    the picture, averaged over the same nouns.
    """
    hits, chance, nouns = 0, 0.0, 0
    for start in range(0, len(dataset), batch_size):
        rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
        _, attentions = caption_with_attention(model, processor, rows["image"], num_beams=num_beams)
        for words, image, objects in zip(attentions, rows["image"], rows["objects"], strict=True):
            for index, item in enumerate(words):
                candidates = [o for o in objects if o["kind"] == item.word]
                if len(candidates) > 1 and index > 0:
                    candidates = [o for o in candidates if o["colour"] == words[index - 1].word]
                if len(candidates) != 1:
                    continue
                x0, y0, x1, y1 = candidates[0]["box"]
                cell = int(np.argmax(item.attention))
                x, y = grid_cell_to_image_point(cell, model.config.grid_size, image.size, processor.image_processor)
                hits += x0 <= x <= x1 + 1 and y0 <= y <= y1 + 1
                chance += (x1 - x0 + 1) * (y1 - y0 + 1) / (image.size[0] * image.size[1])
                nouns += 1
    if nouns == 0:  # no caption named a shape: nothing to measure, and said so rather than a made-up rate
        return {"pointing_accuracy": None, "pointing_chance": None, "pointing_nouns": 0}
    return {"pointing_accuracy": hits / nouns, "pointing_chance": chance / nouns, "pointing_nouns": nouns}


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
    """Caption every image of `dataset`, score against its references, write predictions.jsonl and metrics.json."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    captions = generate_captions(model, processor, dataset, batch_size=batch_size, num_beams=num_beams,
                                 max_new_tokens=max_new_tokens)  # fmt: skip
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
    if "objects" in dataset.column_names:
        metrics["attention"] = pointing_accuracy(model, processor, dataset, num_beams=num_beams)
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
