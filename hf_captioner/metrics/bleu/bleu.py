"""Corpus BLEU-1..4 exactly as the COCO caption evaluation computes it (pycocoevalcap's scorer)."""

import math

from hf_captioner.metrics import coco

CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL}, year={2002}
}"""


EXAMPLES = """\
    >>> from hf_captioner.metrics import load
    >>> bleu = load("bleu")
    >>> predictions = ["a dog runs on the grass", "a man is riding a bike"]
    >>> references = [["a dog runs on the green grass", "a brown dog runs"], "a man is riding a bicycle"]
    >>> scores = bleu.compute(predictions=predictions, references=references)
    >>> [round(scores[f"bleu_{n}"], 3) for n in (1, 2, 3, 4)]
    [0.843, 0.788, 0.754, 0.716]
    >>> scores["bleu"] == scores["bleu_4"], [round(p, 3) for p in scores["precisions"]]
    (True, [0.917, 0.8, 0.75, 0.667])
    >>> round(scores["brevity_penalty"], 3), round(scores["length_ratio"], 3)
    (0.92, 0.923)
"""


class CaptionBleu(coco.CaptionMetric):
    """Corpus BLEU with the brevity penalty from the closest reference length, as in pycocoevalcap.

    Returns bleu_1..bleu_4 and, under the names of evaluate's own `bleu` module, bleu (= bleu_4), precisions (the
    corpus n-gram precisions, n = 1..4), brevity_penalty, length_ratio, translation_length and reference_length.
    With use_aggregator=False: bleu_1..bleu_4 per caption only (the COCO scorer's sentence BLEU).
    """

    def _info(self):
        return coco.metric_info(
            "Corpus BLEU-1..4 of captions, as computed by the COCO caption evaluation code.", CITATION, EXAMPLES
        )

    def _compute(self, predictions, references, use_aggregator=True):
        from pycocoevalcap.bleu.bleu_scorer import BleuScorer

        gts, res = coco.tokenized_corpus(predictions, references)
        scorer = BleuScorer(n=4)  # what pycocoevalcap's Bleu(4).compute_score does, keeping the scorer's counts
        for key in gts:
            scorer += (res[key][0], gts[key])
        scores, caption_scores = scorer.compute_score(option="closest", verbose=0)
        result = {
            f"bleu_{n}": coco.per_caption(scores[n - 1], caption_scores[n - 1], use_aggregator) for n in range(1, 5)
        }
        if not use_aggregator:
            return result
        guesses = [sum(test["guess"][k] for test in scorer.ctest) for k in range(4)]
        correct = [sum(test["correct"][k] for test in scorer.ctest) for k in range(4)]
        ratio = scorer._testlen / scorer._reflen
        return {
            **result,
            "bleu": result["bleu_4"],
            "precisions": [c / g if g else 0.0 for c, g in zip(correct, guesses, strict=True)],
            "brevity_penalty": 1.0 if ratio >= 1 else (math.exp(1 - 1 / ratio) if ratio > 0 else 0.0),
            "length_ratio": ratio,
            "translation_length": scorer._testlen,
            "reference_length": scorer._reflen,
        }
