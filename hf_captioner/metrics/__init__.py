"""Caption metrics as `evaluate` modules that load offline and reproduce the COCO caption evaluation's numbers.

`load("cider")` gives the module; `score_captions(predictions, references)` computes them all (METEOR only where
Java is present, and a logged reason where not).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from .coco import java_available

logger = logging.getLogger(__name__)

METRICS = ("bleu", "meteor", "rouge", "cider")
_MODULE_DIR = Path(__file__).resolve().parent


def metric_path(name: str) -> str:
    """The module file of a caption metric, for `evaluate.load(path)`."""
    if name not in METRICS:
        raise ValueError(f"Unknown caption metric {name!r}; choose from {METRICS}")
    return str(_MODULE_DIR / name / f"{name}.py")


def load(name: str):
    """`evaluate.load` of one of our caption metrics, from the package (no Hub access)."""
    import evaluate

    return evaluate.load(metric_path(name))


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]], meteor: bool = True) -> dict:
    """BLEU-1..4, METEOR (when Java is present and `meteor`), ROUGE-L and CIDEr-D of a corpus."""
    scores: dict[str, float] = {}
    for name in METRICS:
        if name == "meteor" and not (meteor and java_available()):
            if meteor:
                logger.warning("METEOR skipped: it needs Java (the reference METEOR 1.5 is a jar), not found on PATH")
            continue
        scores.update(load(name).compute(predictions=list(predictions), references=[list(r) for r in references]))
    return scores


__all__ = ["METRICS", "load", "metric_path", "score_captions"]
