"""What every caption metric module shares: input checks, COCO-style tokenisation, and the reference's dict format.

The evaluate modules (`metrics/<name>/<name>.py`) import this installed module rather than repeat it.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence

import datasets
import evaluate

from .tokenizer import ptb_tokenize

CITATION_COCO = """\
@article{chen2015microsoft,
  title={Microsoft COCO Captions: Data Collection and Evaluation Server},
  author={Chen, Xinlei and Fang, Hao and Lin, Tsung-Yi and Vedantam, Ramakrishna and Gupta, Saurabh and
          Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  journal={arXiv preprint arXiv:1504.00325},
  year={2015}
}"""

INPUTS = """\
Args:
    predictions: one generated caption (string) per image.
    references: for each prediction, a list of one or more reference captions, or one reference caption (string).
    use_aggregator: True (default): one corpus score per metric. False: a list of per-caption scores instead (each
        caption scored as the COCO scorer scores it alone; for CIDEr-D the idf still comes from the whole corpus).
Captions are lower-cased, PTB-tokenised and stripped of punctuation, as in the COCO caption evaluation code.
An empty prediction is allowed (it scores as the reference scorer scores an empty caption: 0 for BLEU/CIDEr/ROUGE).
"""


def inputs_description(examples: str) -> str:
    """The shared argument description followed by a module's own usage examples."""
    return INPUTS + "\nExamples:\n" + examples


def caption_features() -> datasets.Features:
    return datasets.Features(
        {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
    )


def as_reference_lists(references):
    """Each prediction's references as a list: a single string becomes a list of one."""
    if references is None:
        return None
    return [[refs] if isinstance(refs, str) else refs for refs in references]


class CaptionMetric(evaluate.Metric):
    """What the caption modules share: a reference given as one string is a list of one. (evaluate fixes the input
    format from the first example it sees and would read a later string as a list of its characters.) The modules
    subclass it as `coco.CaptionMetric`: evaluate takes the first metric class in a module's namespace as its own."""

    def add_batch(self, *, predictions=None, references=None, **kwargs):
        """Add a batch of predictions and references (evaluate appends the inputs' description here)."""
        return super().add_batch(predictions=predictions, references=as_reference_lists(references), **kwargs)

    def add(self, *, prediction=None, reference=None, **kwargs):
        """Add one prediction and its reference(s) (evaluate appends the inputs' description here)."""
        reference = [reference] if isinstance(reference, str) else reference
        return super().add(prediction=prediction, reference=reference, **kwargs)


def metric_info(description: str, citation: str, examples: str) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(
        description=description,
        citation=citation + "\n" + CITATION_COCO,
        inputs_description=inputs_description(examples),
        features=caption_features(),
        reference_urls=["https://github.com/salaniz/pycocoevalcap"],
    )


def per_caption(corpus_score: float, caption_scores, use_aggregator: bool):
    """The corpus score, or the per-caption scores (as floats) when `use_aggregator` is False."""
    return float(corpus_score) if use_aggregator else [float(score) for score in caption_scores]


def tokenized_corpus(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(references, predictions) as the pycocoevalcap scorers take them: {id: [tokenised caption, ...]}."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} reference lists")
    if len(predictions) == 0:
        raise ValueError("Cannot score an empty corpus: no predictions were given")
    references = as_reference_lists(references)
    for i, refs in enumerate(references):
        if not refs or not any(r.strip() for r in refs):
            raise ValueError(f"Prediction {i} has no non-empty reference caption")
    gts = {str(i): [" ".join(ptb_tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [" ".join(ptb_tokenize(p))] for i, p in enumerate(predictions)}
    return gts, res


def java_available() -> bool:
    return shutil.which("java") is not None
