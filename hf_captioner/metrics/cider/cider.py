"""CIDEr-D exactly as the COCO caption evaluation computes it (pycocoevalcap's scorer: n=4, sigma=6, x10)."""

import evaluate

from hf_captioner.metrics.coco import metric_info, tokenized_corpus

CITATION = """\
@inproceedings{vedantam2015cider,
  title={CIDEr: Consensus-based Image Description Evaluation},
  author={Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle={CVPR}, year={2015}
}"""


class CaptionCider(evaluate.Metric):
    """CIDEr-D; document frequencies come from the references of the scored corpus itself."""

    def _info(self):
        return metric_info("CIDEr-D of captions, as computed by the COCO caption evaluation code.", CITATION)

    def _compute(self, predictions, references):
        from pycocoevalcap.cider.cider import Cider

        gts, res = tokenized_corpus(predictions, references)
        score, _ = Cider().compute_score(gts, res)
        return {"cider": float(score)}
