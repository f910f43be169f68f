"""METEOR 1.5 as the COCO caption evaluation computes it: pycocoevalcap's scorer, which runs Java."""

import evaluate

from hf_captioner.metrics.coco import java_available, metric_info, tokenized_corpus

CITATION = """\
@inproceedings{denkowski2014meteor,
  title={Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author={Denkowski, Michael and Lavie, Alon},
  booktitle={EACL Workshop on Statistical Machine Translation}, year={2014}
}"""


class CaptionMeteor(evaluate.Metric):
    """METEOR needs a Java runtime (the reference implementation is a jar); without one it says so and stops."""

    def _info(self):
        return metric_info("METEOR 1.5 of captions, as computed by the COCO caption evaluation code (Java).", CITATION)

    def _compute(self, predictions, references):
        if not java_available():
            raise RuntimeError("METEOR needs Java (the reference METEOR 1.5 is a jar) and no `java` is on PATH")
        from pycocoevalcap.meteor.meteor import Meteor

        gts, res = tokenized_corpus(predictions, references)
        scorer = Meteor()
        try:
            score, _ = scorer.compute_score(gts, res)
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
        return {"meteor": float(score)}
