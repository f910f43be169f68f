"""METEOR 1.5 as the COCO caption evaluation computes it: pycocoevalcap's scorer, which runs Java."""

from hf_captioner.metrics import coco

CITATION = """\
@inproceedings{denkowski2014meteor,
  title={Meteor Universal: Language Specific Translation Evaluation for Any Target Language},
  author={Denkowski, Michael and Lavie, Alon},
  booktitle={EACL Workshop on Statistical Machine Translation}, year={2014}
}"""


EXAMPLES = """\
    >>> from hf_captioner.metrics import load
    >>> meteor = load("meteor")  # needs a Java runtime on PATH
    >>> predictions = ["a dog runs on the grass"]
    >>> scores = meteor.compute(predictions=predictions, references=["a dog running on grass"])
    >>> sorted(scores)
    ['meteor']
"""


class CaptionMeteor(coco.CaptionMetric):
    """METEOR needs a Java runtime (the reference implementation is a jar); without one it says so and stops."""

    def _info(self):
        return coco.metric_info(
            "METEOR 1.5 of captions, as computed by the COCO caption evaluation code (Java).", CITATION, EXAMPLES
        )

    def _compute(self, predictions, references, use_aggregator=True):
        if not coco.java_available():
            raise RuntimeError("METEOR needs Java (the reference METEOR 1.5 is a jar) and no `java` is on PATH")
        from pycocoevalcap.meteor.meteor import Meteor

        gts, res = coco.tokenized_corpus(predictions, references)
        scorer = Meteor()
        try:
            score, scores = scorer.compute_score(gts, res)
        finally:
            scorer.meteor_p.kill()
            scorer.meteor_p.wait()
        return {"meteor": coco.per_caption(score, scores, use_aggregator)}
