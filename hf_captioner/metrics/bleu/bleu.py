"""Corpus BLEU-1..4 exactly as the COCO caption evaluation computes it (pycocoevalcap's scorer)."""

import evaluate

from hf_captioner.metrics.coco import metric_info, tokenized_corpus

CITATION = """\
@inproceedings{papineni2002bleu,
  title={BLEU: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle={ACL}, year={2002}
}"""


class CaptionBleu(evaluate.Metric):
    """Corpus BLEU with the brevity penalty from the closest reference length, as in pycocoevalcap."""

    def _info(self):
        return metric_info("Corpus BLEU-1..4 of captions, as computed by the COCO caption evaluation code.", CITATION)

    def _compute(self, predictions, references):
        from pycocoevalcap.bleu.bleu import Bleu

        gts, res = tokenized_corpus(predictions, references)
        scores, _ = Bleu(4).compute_score(gts, res, verbose=0)
        return {f"bleu_{n}": float(score) for n, score in enumerate(scores, start=1)}
