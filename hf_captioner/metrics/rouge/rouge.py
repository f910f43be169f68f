"""ROUGE-L exactly as the COCO caption evaluation computes it (pycocoevalcap's scorer, beta = 1.2)."""

import evaluate

from hf_captioner.metrics.coco import metric_info, tokenized_corpus

CITATION = """\
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out}, year={2004}
}"""


class CaptionRouge(evaluate.Metric):
    """ROUGE-L F-measure against the best-matching reference, averaged over images."""

    def _info(self):
        return metric_info("ROUGE-L of captions, as computed by the COCO caption evaluation code.", CITATION)

    def _compute(self, predictions, references):
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = tokenized_corpus(predictions, references)
        score, _ = Rouge().compute_score(gts, res)
        return {"rouge_l": float(score)}
