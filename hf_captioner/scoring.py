"""Corpus caption scores (BLEU-1..4, CIDEr-D) with the COCO caption evaluation's own scorers (pycocoevalcap).

The scorers get captions lower-cased with punctuation split off and dropped, close to the PTB tokenisation step
of the COCO evaluation code.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PUNCTUATION = re.compile(r"[^\w\s']|'(?!\w)|(?<!\w)'")


def simple_ptb_tokenize(caption: str) -> str:
    """Lower-case; split off and drop punctuation (keeps word-internal apostrophes, as in "dog's")."""
    return " ".join(_PUNCTUATION.sub(" ", caption.lower()).split())


def score_captions(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU-1..4 (closest reference length) and CIDEr-D for a corpus; one prediction per reference list."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError("Cannot score an empty corpus")
    results = {str(i): [simple_ptb_tokenize(p)] for i, p in enumerate(predictions)}
    gold = {str(i): [simple_ptb_tokenize(r) for r in refs] for i, refs in enumerate(references)}
    if any(not refs for refs in references):
        raise ValueError("Every prediction needs at least one reference caption")
    bleu, _ = Bleu(4).compute_score(gold, results, verbose=0)
    cider, _ = Cider().compute_score(gold, results)
    scores = {f"bleu_{n}": float(b) for n, b in enumerate(bleu, start=1)}
    scores["cider"] = float(cider)
    return scores
