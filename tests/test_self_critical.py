"""Self-critical training: its CIDEr-D reward, its sample targets, the direction of its gradient, and a run."""

import json

import pytest
import torch
from conftest import tiny_arguments
from pycocoevalcap.cider.cider import Cider
from transformers import AutoModel

from hf_captioner.arguments import TrainingArguments
from hf_captioner.data.pairs import CaptionedImages, ImageCollator
from hf_captioner.metrics.coco import tokenized_corpus
from hf_captioner.model_card import render_model_card
from hf_captioner.processing_captioner import CaptionerProcessor
from hf_captioner.self_critical import CiderDReward, SelfCriticalObjective
from hf_captioner.training import load_data, train

REFERENCES = [
    ["A dog runs across the grass.", "A brown dog is running on a lawn", "the dog plays in the green grass"],
    ["Two children play on a beach", "Kids are playing in the sand near the ocean.", "two kids at the beach"],
    ["A man rides a bike down a hill", "A cyclist rides down the dirt trail.", "a person on a mountain bike"],
    ["A girl in a red dress smiles", "A young girl wearing red is smiling", "the little girl's dress is red"],
]
PREDICTIONS = ["a dog running on the grass", "two kids play in the sand", "a man on a bike", "a girl in red"]


def test_reward_is_the_coco_cider_d_of_each_caption_when_the_corpus_is_the_scored_one():
    reward = CiderDReward(REFERENCES)
    gts, res = tokenized_corpus(PREDICTIONS, REFERENCES)
    corpus_score, per_caption = Cider().compute_score(gts, res)
    mine = [reward(caption, i) for i, caption in enumerate(PREDICTIONS)]
    assert mine == pytest.approx(list(per_caption), rel=1e-9, abs=1e-12)
    assert sum(mine) / len(mine) == pytest.approx(corpus_score)
    assert reward("", 0) == 0.0
    # idf is fixed by the corpus given at construction: scoring one caption alone gives the same number
    assert reward(PREDICTIONS[1], 1) == mine[1]
    # the reference vectors kept are bounded; those made again on demand give the same rewards
    small = CiderDReward(REFERENCES, cached_images=2)
    assert [small(caption, i) for _ in range(2) for i, caption in enumerate(PREDICTIONS)] == mine * 2
    assert small._reference_vectors.cache_info().currsize == 2


def test_sample_targets_stop_after_the_first_end_of_caption():
    samples = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 7, 2, 8, 2, 0], [1, 5, 6, 7, 8, 9]])  # start 1, </s> 2, pad 0
    labels = SelfCriticalObjective.sample_labels(samples, eos_token_id=2)
    assert labels.tolist() == [[5, 6, 2, -100, -100], [7, 2, -100, -100, -100], [5, 6, 7, 8, 9]]


def test_rewarding_short_captions_makes_the_sampled_captions_shorter(trained_tiny_model, tmp_path):
    """The gradient has the right sign: samples that beat their siblings become more likely."""
    model = AutoModel.from_pretrained(trained_tiny_model)
    processor = CaptionerProcessor.from_pretrained(trained_tiny_model)
    data = load_data(tiny_arguments(tmp_path, sample_sizes=[48, 12, 8]))["train"].select(range(16))
    objective = SelfCriticalObjective(processor, data["captions"], num_samples=4, max_new_tokens=12)
    objective.reward = lambda caption, image: -float(len(caption.split()))
    batch = ImageCollator(processor)([CaptionedImages(data)[i] for i in range(16)])
    optimizer = torch.optim.Adam(model.decoder.parameters(), lr=1e-2)

    def mean_sample_tokens(seed: int) -> float:
        torch.manual_seed(seed)
        with torch.no_grad():
            return objective(model, batch)[1]["train/sample_tokens"]

    before = sum(mean_sample_tokens(seed) for seed in range(3)) / 3
    torch.manual_seed(0)
    for _ in range(15):
        loss, _ = objective(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = sum(mean_sample_tokens(seed) for seed in range(3)) / 3
    assert after < 0.7 * before, (before, after)


def test_self_critical_fine_tuning_runs_from_a_trained_model(trained_tiny_model, tmp_path):
    args = tiny_arguments(
        tmp_path / "scst",
        sample_sizes=[48, 12, 8],
        objective="self_critical",
        self_critical_samples=3,
        init_from=str(trained_tiny_model),
        processor_path=str(trained_tiny_model),
        num_epochs=1,
        batch_size=8,
        learning_rate=1e-4,
        log_every_steps=2,
    )
    metrics = train(args)
    assert metrics["steps"] == 6  # 48 images, 8 per step: one example per image, not per caption
    assert {"cider", "bleu_4"} <= set(metrics["history"][0])
    saved = json.loads((tmp_path / "scst" / "final" / "training_args.json").read_text())
    assert saved["objective"] == "self_critical"
    card = render_model_card(tmp_path / "scst" / "final")
    assert "Self-critical sequence training: 3 captions sampled per image" in card
    assert f"Started from the captioner `{trained_tiny_model}`" in card
    AutoModel.from_pretrained(tmp_path / "scst" / "final")


def test_unknown_objective_and_too_few_samples_are_clear_errors():
    with pytest.raises(ValueError, match="objective: expected one of"):
        TrainingArguments(objective="cider")
    with pytest.raises(ValueError, match="at least 2 samples"):
        SelfCriticalObjective(None, REFERENCES, num_samples=1)
