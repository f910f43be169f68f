"""Evaluate a saved captioner on a data split: captions, COCO metrics, and (with boxes) where the attention goes.

`hf-captioner evaluate` is the command line; `evaluate_split` is the same for notebooks.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from .attention_measures import AttentionMeasures, entity_regions, shape_regions
from .inference import generate_captions
from .metrics import score_captions
from .model_card import METRIC_NAMES

logger = logging.getLogger(__name__)


def repetition_rates(captions: list[str]) -> dict:
    """How much the captions stutter ("on a skateboard on a skateboard"): the share of captions in which some word
    bigram, and some word trigram, occurs more than once."""

    def repeats(words: list[str], n: int) -> bool:
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        return len(grams) != len(set(grams))

    split = [caption.lower().split() for caption in captions]
    count = max(len(split), 1)
    return {
        f"repeated_{name}_rate": sum(repeats(words, n) for words in split) / count
        for n, name in ((2, "bigram"), (3, "trigram"))
    }


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
    entities: dict | None = None,
    generate_kwargs: dict | None = None,
) -> dict:
    """Caption every image of `dataset`, score against its references, write predictions.jsonl and metrics.json.
    With boxes of what the captions name — the sample set's shapes (`objects`), or Flickr30k Entities annotations
    (`entities`, from `attention_measures.load_flickr30k_entities`) — the same captioning pass also measures where
    the attention goes (see attention_measures.py). `generate_kwargs` go to `generate()` (e.g. no_repeat_ngram_size)
    on top of the model's saved generation config."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    measures = None
    if "objects" in dataset.column_names or entities is not None:
        regions_of = shape_regions(dataset) if entities is None else entity_regions(entities, dataset)
        measures = AttentionMeasures(regions_of, model.config.grid_size, processor.image_processor)
    captions = generate_captions(
        model,
        processor,
        dataset,
        batch_size=batch_size,
        on_attention=measures,
        num_beams=num_beams,
        max_new_tokens=max_new_tokens,
        **(generate_kwargs or {}),
    )
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
        **({"generate_kwargs": generate_kwargs} if generate_kwargs else {}),
        "metrics": scores,
        "repetition": repetition_rates(captions),
        **(extra or {}),
    }
    if measures is not None:
        metrics["attention"] = measures.result()
    (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def format_table(metrics: dict) -> str:
    """The scores as a small Markdown table (x100, as papers report them; CIDEr-D too)."""
    scores = metrics["metrics"]
    names = METRIC_NAMES
    header = "| split | beams | " + " | ".join(names[k] for k in names if k in scores) + " |"
    rule = "|" + "---|" * (2 + sum(k in scores for k in names))
    values = (
        f"| {metrics['split']} | {metrics['num_beams']} | "
        + " | ".join(f"{100 * scores[k]:.1f}" for k in names if k in scores)
        + " |"
    )
    lines = [header, rule, values]
    if "repetition" in metrics:
        r = metrics["repetition"]
        lines.append(
            f"\nCaptions repeating a word bigram: {100 * r['repeated_bigram_rate']:.1f}%, a trigram: "
            f"{100 * r['repeated_trigram_rate']:.1f}%"
        )
    if metrics.get("attention", {}).get("pointing_nouns"):
        a = metrics["attention"]
        moves = "n/a" if a["peak_moves"] is None else f"{100 * a['peak_moves']:.1f}%"
        lines.append(
            f"\nPointing accuracy {100 * a['pointing_accuracy']:.1f}% and attention in the boxes "
            f"{100 * a['attention_in_boxes']:.1f}% over {a['pointing_nouns']} named words (chance of both "
            f"{100 * a['pointing_chance']:.1f}%); normalised entropy {a['normalised_entropy']:.2f}, peak moves "
            f"between words {moves}"
        )
        if a.get("sentinel_share_named") is not None and a.get("sentinel_share_other") is not None:
            lines.append(
                f"Attention given to the visual sentinel: {100 * a['sentinel_share_named']:.1f}% on named words, "
                f"{100 * a['sentinel_share_other']:.1f}% on the others"
            )
    return "\n".join(lines)
