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
    references: for each prediction, a list of one or more reference captions.
Captions are lower-cased, PTB-tokenised and stripped of punctuation, as in the COCO caption evaluation code.
An empty prediction is allowed (it scores as the reference scorer scores an empty caption: 0 for BLEU/CIDEr/ROUGE).
"""


def caption_features() -> datasets.Features:
    return datasets.Features(
        {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
    )


def metric_info(description: str, citation: str) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(
        description=description,
        citation=citation + "\n" + CITATION_COCO,
        inputs_description=INPUTS,
        features=caption_features(),
        reference_urls=["https://github.com/salaniz/pycocoevalcap"],
    )


def tokenized_corpus(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """(references, predictions) as the pycocoevalcap scorers take them: {id: [tokenised caption, ...]}."""
    if len(predictions) != len(references):
        raise ValueError(f"Got {len(predictions)} predictions but {len(references)} reference lists")
    if len(predictions) == 0:
        raise ValueError("Cannot score an empty corpus: no predictions were given")
    for i, refs in enumerate(references):
        if not refs or not any(r.strip() for r in refs):
            raise ValueError(f"Prediction {i} has no non-empty reference caption")
    gts = {str(i): [" ".join(ptb_tokenize(r)) for r in refs] for i, refs in enumerate(references)}
    res = {str(i): [" ".join(ptb_tokenize(p))] for i, p in enumerate(predictions)}
    return gts, res


def java_available() -> bool:
    return shutil.which("java") is not None
