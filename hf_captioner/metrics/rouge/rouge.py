"""ROUGE-L exactly as the COCO caption evaluation computes it (pycocoevalcap's scorer, beta = 1.2)."""

from hf_captioner.metrics import coco

CITATION = """\
@inproceedings{lin2004rouge,
  title={ROUGE: A Package for Automatic Evaluation of Summaries},
  author={Lin, Chin-Yew},
  booktitle={Text Summarization Branches Out}, year={2004}
}"""


EXAMPLES = """\
    >>> from hf_captioner.metrics import load
    >>> rouge = load("rouge")
    >>> predictions = ["a dog runs on the grass", "a man is riding a bike"]
    >>> references = [["a dog runs on the green grass", "a brown dog runs"], "a man is riding a bicycle"]
    >>> round(rouge.compute(predictions=predictions, references=references)["rouge_l"], 3)
    0.872
    >>> [round(s, 3) for s in rouge.compute(predictions=predictions, references=references,
    ...                                     use_aggregator=False)["rouge_l"]]
    [0.91, 0.833]
"""


class CaptionRouge(coco.CaptionMetric):
    """ROUGE-L F-measure against the best-matching reference, averaged over images."""

    def _info(self):
        return coco.metric_info(
            "ROUGE-L of captions, as computed by the COCO caption evaluation code.", CITATION, EXAMPLES
        )

    def _compute(self, predictions, references, use_aggregator=True):
        from pycocoevalcap.rouge.rouge import Rouge

        gts, res = coco.tokenized_corpus(predictions, references)
        score, scores = Rouge().compute_score(gts, res)
        return {"rouge_l": coco.per_caption(score, scores, use_aggregator)}
