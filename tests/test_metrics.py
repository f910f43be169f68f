"""The caption metrics: agreement with pycocoevalcap, known values, bad input, and the tokenizer against Java."""

import doctest
import math
import random
import re
from pathlib import Path

import pytest
from conftest import python_snippets
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from hf_captioner.metrics import load, score_captions
from hf_captioner.metrics.coco import java_available
from hf_captioner.metrics.tokenizer import PUNCTUATIONS, ptb_tokenize

VOCABULARY = "a the dog cat man woman red blue runs sits on in grass water ball two with of is are".split()


def random_corpus(seed: int, size: int = 40) -> tuple[list[str], list[list[str]]]:
    rng = random.Random(seed)
    sentence = lambda: " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(3, 12)))  # noqa: E731
    predictions = [sentence() for _ in range(size)]
    references = [[sentence() for _ in range(rng.randint(1, 5))] for _ in range(size)]
    return predictions, references


def reference_scores(predictions, references) -> dict:
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    return {
        **{f"bleu_{n}": b for n, b in enumerate(bleu, 1)},
        "cider": Cider().compute_score(gts, res)[0],
        "rouge_l": Rouge().compute_score(gts, res)[0],
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_agree_with_pycocoevalcap_on_the_same_tokens(seed):
    predictions, references = random_corpus(seed)
    ours = {}
    for name in ("bleu", "cider", "rouge"):
        ours.update(load(name).compute(predictions=predictions, references=references))
    expected = reference_scores(predictions, references)
    for key, value in expected.items():
        assert ours[key] == pytest.approx(value, abs=1e-6), key


@pytest.mark.skipif(not java_available(), reason="METEOR's reference implementation needs Java")
def test_meteor_agrees_with_pycocoevalcap():
    from pycocoevalcap.meteor.meteor import Meteor

    predictions, references = random_corpus(5, size=15)
    scorer = Meteor()
    expected, _ = scorer.compute_score(
        {i: r for i, r in enumerate(references)}, {i: [p] for i, p in enumerate(predictions)}
    )
    scorer.meteor_p.kill()
    assert load("meteor").compute(predictions=predictions, references=references)["meteor"] == pytest.approx(
        expected, abs=1e-6
    )


def test_hand_checked_values():
    same = score_captions(["a dog runs on the grass"], [["a dog runs on the grass"]], meteor=False)
    assert same["bleu_4"] == pytest.approx(1.0, abs=1e-6) and same["rouge_l"] == pytest.approx(1.0)
    disjoint = score_captions(["red blue cat"], [["a dog runs on the grass"]], meteor=False)
    assert disjoint["bleu_1"] == pytest.approx(0.0, abs=1e-6) and disjoint["bleu_4"] == pytest.approx(0.0, abs=1e-6)
    assert disjoint["cider"] == 0.0 and disjoint["rouge_l"] == 0.0
    # punctuation and case do not count, as in the COCO evaluation
    punctuated = score_captions(["A dog, running!"], [["a dog running"]], meteor=False)
    assert punctuated["bleu_3"] == pytest.approx(1.0, abs=1e-6)


def test_empty_predictions_score_zero_and_bad_corpora_are_refused():
    scores = score_captions(["", "a dog runs"], [["a dog runs"], ["a dog runs"]], meteor=False)
    assert 0.0 <= scores["bleu_1"] < 1.0 and scores["cider"] >= 0.0
    with pytest.raises(ValueError, match="empty corpus"):
        score_captions([], [], meteor=False)
    with pytest.raises(ValueError):
        score_captions(["a dog"], [["a dog"], ["a cat"]], meteor=False)
    with pytest.raises(ValueError, match="no non-empty reference"):
        score_captions(["a dog"], [[""]], meteor=False)


def test_tokenizer_follows_ptb_conventions():
    assert ptb_tokenize("A man's dog isn't \"happy\" (really).") == [
        "a",
        "man",
        "'s",
        "dog",
        "is",
        "n't",
        "happy",
        "-lrb-",
        "really",
        "-rrb-",
    ]
    assert ptb_tokenize("A 3.5-year-old boy; 1,000 people at 10:30 a.m.") == [
        "a",
        "3.5-year-old",
        "boy",
        "1,000",
        "people",
        "at",
        "10:30",
        "a.m.",
    ]
    assert ptb_tokenize("can't cannot") == ["ca", "n't", "can", "not"]
    assert not set(ptb_tokenize("... -- ; : ! ? , . ' ` '' ``")) & PUNCTUATIONS


def varied_captions(count: int = 300) -> list[str]:
    """Captions with the things tokenizers disagree on: quotes, hyphens, apostrophes, numbers, brackets, unicode."""
    rng = random.Random(7)
    subjects = [
        "A man",
        "the dog's owner",
        "Two kids'",
        "A woman (smiling)",
        "The T-shirt",
        "Mr. Smith",
        "A 3-year-old",
        "Children",
        "A café's chef",
        "The naïve puppy",
        "People at 10:30 a.m.",
        "Dogs",
    ]
    verbs = [
        "isn't running",
        "can't see",
        "won't stop",
        "is jumping",
        "plays",
        "rides a bike",
        "holds $5",
        'wears a "cool" hat',
        "reads 'books'",
        "eats 1,000 fries",
        "sits -- quietly --",
        "walks…",
    ]
    places = [
        "on the grass.",
        "in the U.S.A.",
        "near a black-and-white sign!",
        "at Joe's diner?",
        "[outside]",
        "in São Paulo; ok",
        "by the sea , smiling",
        "with 50% off",
        "etc.",
        "under “quotes” here",
        "to the left",
    ]
    captions = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(places)}" for _ in range(count)]
    return [c.capitalize() if rng.random() < 0.5 else c for c in captions]


@pytest.mark.skipif(not java_available(), reason="the reference tokenizer (Stanford CoreNLP) needs Java")
def test_tokenizer_gives_the_java_ptb_tokenizers_tokens():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    captions = varied_captions()
    java = PTBTokenizer().tokenize({str(i): [{"caption": c}] for i, c in enumerate(captions)})
    disagreements = [
        (c, java[str(i)][0], " ".join(ptb_tokenize(c)))
        for i, c in enumerate(captions)
        if java[str(i)][0] != " ".join(ptb_tokenize(c))
    ]
    assert not disagreements, disagreements[:5]


@pytest.mark.parametrize("name", ["bleu", "cider", "rouge", "meteor"])
def test_usage_examples_in_the_module_docs_run_as_written(name):
    if name == "meteor" and not java_available():
        pytest.skip("METEOR needs Java")
    text = load(name).info.inputs_description
    examples = doctest.DocTestParser().get_doctest(text, {}, name, None, 0)
    assert examples.examples, f"{name} has no usage examples"
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    runner.run(examples)
    assert runner.summarize(verbose=False).failed == 0


def test_a_single_reference_string_counts_as_a_list_of_one_in_any_position():
    predictions = ["a dog runs on the grass", "a man is riding a bike", "two cats sit"]
    as_lists = [["a dog runs on grass"], ["a man is riding a bicycle"], ["two cats are sitting"]]
    mixed = [as_lists[0], as_lists[1][0], as_lists[2][0]]  # a list first, then strings
    for name in ("bleu", "cider", "rouge"):
        assert load(name).compute(predictions=predictions, references=mixed) == load(name).compute(
            predictions=predictions, references=as_lists
        )
    metric = load("cider")
    metric.add_batch(predictions=predictions[:1], references=as_lists[:1])
    metric.add_batch(predictions=predictions[1:], references=[r[0] for r in as_lists[1:]])
    assert metric.compute() == load("cider").compute(predictions=predictions, references=as_lists)


def test_per_caption_scores_are_the_coco_scorers_per_image_scores():
    predictions, references = random_corpus(3, size=12)
    gts = {i: refs for i, refs in enumerate(references)}
    res = {i: [p] for i, p in enumerate(predictions)}
    expected = {"cider": Cider().compute_score(gts, res)[1], "rouge_l": Rouge().compute_score(gts, res)[1]}
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[1]
    expected.update({f"bleu_{n}": bleu[n - 1] for n in range(1, 5)})
    per_caption = {}
    for name in ("bleu", "cider", "rouge"):
        per_caption.update(load(name).compute(predictions=predictions, references=references, use_aggregator=False))
    assert per_caption.keys() == expected.keys()
    for key, values in expected.items():
        assert per_caption[key] == pytest.approx(list(values), abs=1e-9), key


def test_bleu_also_reports_evaluates_own_bleu_keys():
    predictions, references = random_corpus(4, size=20)
    references[0].append(predictions[0] + " too")  # so that every n-gram order has matches (the scorer smooths zeros)
    scores = load("bleu").compute(predictions=predictions, references=references)
    assert min(scores["precisions"]) > 0
    assert scores["bleu"] == scores["bleu_4"]
    assert len(scores["precisions"]) == 4 and all(0 <= p <= 1 for p in scores["precisions"])
    assert scores["length_ratio"] == pytest.approx(scores["translation_length"] / scores["reference_length"])
    # BLEU-n is the brevity penalty times the geometric mean of the first n precisions
    for n in range(1, 5):
        mean = math.prod(scores["precisions"][:n]) ** (1 / n)
        assert scores[f"bleu_{n}"] == pytest.approx(scores["brevity_penalty"] * mean, rel=1e-6, abs=1e-9)


def test_the_documented_metric_snippet_runs_and_shows_its_real_results():
    readme = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    (snippet,) = [s for s in python_snippets(readme) if "hf_captioner.metrics" in s]
    namespace: dict = {}
    exec(snippet, namespace)
    cider, predictions, references = (namespace[name] for name in ("cider", "predictions", "references"))
    shown = [line.split("# ")[1] for line in snippet.splitlines() if "# {'cider'" in line]
    corpus = cider.compute(predictions=predictions, references=references)["cider"]
    per_caption = cider.compute(predictions=predictions, references=references, use_aggregator=False)["cider"]
    for computed, comment in zip([[corpus], per_caption], shown, strict=True):
        numbers = re.findall(r"\d+\.\d+", comment)  # shown cut short with "..."
        assert len(numbers) == len(computed)
        assert all(f"{value:.6f}".startswith(number) for value, number in zip(computed, numbers, strict=True))
