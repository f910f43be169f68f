"""CIDEr-D exactly as the COCO caption evaluation computes it (pycocoevalcap's scorer: n=4, sigma=6, x10)."""

from hf_captioner.metrics import coco

CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR}, year={2015}
}"""


EXAMPLES = """\
    >>> from hf_captioner.metrics import load
    >>> cider = load("cider")
    >>> predictions = ["a dog runs on the grass", "a man is riding a bike"]
    >>> references = [["a dog runs on the green grass", "a brown dog runs"], "a man is riding a bicycle"]
    >>> round(cider.compute(predictions=predictions, references=references)["cider"], 3)
    5.948
    >>> [round(s, 3) for s in cider.compute(predictions=predictions, references=references,
    ...                                     use_aggregator=False)["cider"]]
    [4.48, 7.417]
"""


class CaptionCider(coco.CaptionMetric):
    """CIDEr-D; document frequencies come from the references of the scored corpus itself."""

    def _info(self):
        return coco.metric_info(
            "CIDEr-D of captions, as computed by the COCO caption evaluation code.", CITATION, EXAMPLES
        )

    def _compute(self, predictions, references, use_aggregator=True):
        from pycocoevalcap.cider.cider import Cider

        gts, res = coco.tokenized_corpus(predictions, references)
        score, scores = Cider().compute_score(gts, res)
        return {"cider": coco.per_caption(score, scores, use_aggregator)}
