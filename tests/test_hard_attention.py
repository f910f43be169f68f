"""Hard (stochastic) attention, Show, Attend and Tell section 4.1: the estimator, the switches, generation."""

import itertools
import math
from collections import Counter

import pytest
import torch
from conftest import tiny_arguments, tiny_model
from transformers import AutoModel, AutoProcessor

from hf_captioner.configuration_captioner import CaptionerConfig
from hf_captioner.data.sample import make_sample_dataset
from hf_captioner.evaluation import evaluate_split
from hf_captioner.metrics import score_captions
from hf_captioner.modeling_captioner import chosen_regions
from hf_captioner.training import train

CAPTION = torch.tensor([[7, 2]])  # one word and </s>: two steps, so the bound sums over k^2 region sequences


def hard_model(**overrides):
    """A tiny hard-attention model on a 2 x 2 grid, in float64 so that the exact gradient is exact."""
    values = dict(
        hard_attention=True,
        grid_size=2,
        attention_penalty=0.0,
        label_smoothing=0.0,
        hard_attention_entropy_weight=0.0,
        hard_attention_reinforce_weight=1.0,  # the bound's unbiased estimator (the default 0.1 rescales its term)
    )
    values.update(overrides)
    return tiny_model(seed=3, **values).double().train()


def regions_for(model, seed: int = 4) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, model.encoder.num_channels, generator=generator, dtype=torch.float64)


def gradient(model, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)  # the policy term alone leaves the output layer out
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params, strict=True)]
    )


def exact_bound(model, regions: torch.Tensor) -> torch.Tensor:
    """L_s = sum over every region sequence s of p(s | a) log p(y | s, a), by enumeration: each sequence is read by
    forcing the noise of each step into the slice of the cumulative weights that selects its region."""
    inputs, k = model.shift_labels_right(CAPTION), regions.shape[1]
    bound = 0.0
    for sequence in itertools.product(range(k), repeat=CAPTION.shape[1]):
        noise = torch.full(CAPTION.shape, 0.5, dtype=torch.float64)
        for t, region in enumerate(sequence):  # alpha_t depends on the regions read before t
            _, weights, _ = model.decoder(inputs, regions, model.decoder.start(regions), noise=noise)
            with torch.no_grad():
                noise[0, t] = weights[0, t, : region + 1].sum() - weights[0, t, region] / 2
        logits, weights, _ = model.decoder(inputs, regions, model.decoder.start(regions), noise=noise)
        assert chosen_regions(weights[0], noise[0]).tolist() == list(sequence)
        log_likelihood = logits.log_softmax(-1)[0].gather(-1, CAPTION[0].unsqueeze(-1)).sum()
        probability = weights[0, torch.arange(len(sequence)), list(sequence)].prod()
        bound = bound + probability * log_likelihood
    return bound


def sampled_gradients(
    model, regions: torch.Tensor, baseline: float | None, batches: int, copies: int, part: str = "loss"
) -> torch.Tensor:
    """One mean gradient of the training loss (`part`: or one of its parts) per batch of `copies` samples, regions
    drawn (batches, parameters); `baseline`: fixed (no sample moves it), or None for the model's moving average."""
    torch.manual_seed(0)
    labels = CAPTION.repeat(copies, 1)
    grads = []
    for _ in range(batches):
        if baseline is not None:
            model.reward_baseline = torch.tensor(baseline, dtype=torch.float64)
        outputs = model(
            encoder_outputs=regions.repeat(copies, 1, 1), labels=labels, use_cache=False, sample_regions=True
        )
        grads.append(gradient(model, outputs[part]))
    return torch.stack(grads)


def z_scores(samples: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """How many standard errors of the mean (which shrink as 1/sqrt(number of samples)) separate the sampled
    gradients' mean from the expected one, per parameter (a tiny floor keeps deterministic entries finite)."""
    standard_error = samples.std(dim=0) / samples.shape[0] ** 0.5
    return (samples.mean(dim=0) - expected).abs() / (standard_error + 1e-10)


@pytest.mark.parametrize(
    "decoder_type,reward,baseline,draws",
    [
        ("show_attend_tell", "caption", "moving_average", 1),
        ("top_down", "caption", "moving_average", 1),
        ("show_attend_tell", "remaining", "moving_average", 1),
        ("show_attend_tell", "remaining", "expected_context", 1),
        ("show_attend_tell", "remaining", "other_draws", 2),
    ],
)
def test_the_reinforce_estimator_is_unbiased_for_the_bounds_gradient(decoder_type, reward, baseline, draws):
    """The mean of many sampled training gradients equals the exact gradient of -L_s / T (the loss divides by the
    number of tokens), L_s enumerated over every region sequence; dropping the score-function term is detectably
    biased with the same samples, so the check has the power to fail. For either decoder, either reward and every
    baseline (the variance reductions meant to be unbiased)."""
    model = hard_model(
        decoder_type=decoder_type,
        hard_attention_reward=reward,
        hard_attention_baseline=baseline,
        hard_attention_draws=draws,
    )
    regions = regions_for(model)
    bound = exact_bound(model, regions)
    expected = gradient(model, -bound / CAPTION.shape[1])
    samples = sampled_gradients(model, regions, baseline=bound.item(), batches=60, copies=64)
    assert z_scores(samples, expected).max() < 6

    model.config.hard_attention_reinforce_weight = 0.0
    biased = sampled_gradients(model, regions, baseline=bound.item(), batches=60, copies=64)
    assert z_scores(biased, expected).max() > 10


def test_the_remaining_words_reward_has_less_variance_than_the_captions():
    """The draw of the last step cannot change the first word: leaving that word's log-likelihood out of its reward
    takes noise out of the score-function term (the same samples, each reward's own moving baseline settled first;
    the policy term's gradient, its variance summed over the parameters: 26% less here)."""
    variances = {}
    for reward in ("caption", "remaining"):
        model = hard_model(hard_attention_reward=reward)
        regions = regions_for(model)
        sampled_gradients(model, regions, baseline=None, batches=20, copies=8)
        samples = sampled_gradients(model, regions, baseline=None, batches=40, copies=8, part="attention_loss")
        variances[reward] = samples.var(dim=0).sum().item()
    assert variances["remaining"] < 0.9 * variances["caption"], variances


@pytest.mark.parametrize("per_caption", ["expected_context", "other_draws"])
def test_a_per_caption_baseline_knows_each_captions_difficulty(per_caption):
    """Two captions of different lengths in a batch: a moving average is one baseline for both, so the policy term
    mostly learns which caption it was given; the expected-context reading, or the caption's other draw, gives each
    caption its own baseline and the policy gradient's variance falls by orders of magnitude (about 10^5 for either
    here; both runs read each caption twice)."""
    captions = torch.tensor([[7, 9, 2], [5, 2, -100]]).repeat(8, 1)
    variances = {}
    for baseline in ("moving_average", per_caption):
        model = hard_model(hard_attention_baseline=baseline, hard_attention_draws=2)
        regions = regions_for(model).repeat(len(captions), 1, 1)
        torch.manual_seed(0)
        grads = []
        for _ in range(40):
            outputs = model(encoder_outputs=regions, labels=captions, use_cache=False, sample_regions=True)
            grads.append(gradient(model, outputs.attention_loss))
        variances[baseline] = torch.stack(grads[10:]).var(dim=0).sum().item()  # the moving average settled
    assert variances[per_caption] < variances["moving_average"] / 100, variances


def test_each_caption_is_read_once_per_draw_and_its_draws_are_their_own_baselines():
    model = hard_model(hard_attention_draws=3, hard_attention_baseline="other_draws")
    labels = torch.tensor([[7, 2], [5, 2]])
    torch.manual_seed(0)
    outputs = model(
        encoder_outputs=regions_for(model).repeat(2, 1, 1), labels=labels, use_cache=False, sample_regions=True
    )
    assert outputs.logits.shape[0] == 6  # rows 0-2 caption 0's draws, 3-5 caption 1's
    rewards = torch.tensor([[1.0], [2.0], [6.0], [-3.0], [-3.0], [0.0]])
    torch.testing.assert_close(
        model.other_draws_mean(rewards), torch.tensor([[4.0], [3.5], [1.5], [-1.5], [-1.5], [-3.0]])
    )
    assert model.reward_baseline is None  # no moving average is kept
    model.eval()
    assert model(encoder_outputs=regions_for(model), labels=CAPTION, use_cache=False).logits.shape[0] == 1


@pytest.mark.parametrize(
    "fields,message",
    [
        ({"hard_attention_baseline": "other_draws"}, "needs hard_attention_draws >= 2"),
        ({"hard_attention_draws": 0}, "hard_attention_draws must be a positive integer"),
    ],
)
def test_draws_and_their_baseline_are_checked(fields, message):
    with pytest.raises(ValueError, match=message):
        CaptionerConfig(grid_size=2, **fields)


def test_the_per_step_baseline_moves_only_the_steps_a_batch_has():
    model = hard_model(hard_attention_reward="remaining", hard_attention_baseline_decay=0.5)
    model.reward_baseline = torch.tensor([-4.0, -2.0, -1.0], dtype=torch.float64)
    baseline = model.moving_reward_baseline(
        torch.tensor([-6.0, -3.0], dtype=torch.float64), torch.tensor([True, False])
    )
    assert baseline.tolist() == [-4.0, -2.0]  # the averages before this batch
    assert model.reward_baseline.tolist() == [-5.0, -2.0, -1.0]  # step 2 had no caption; step 3 was not in the batch
    model.moving_reward_baseline(torch.tensor([-6.0, -3.0, -1.0, -0.5], dtype=torch.float64), torch.ones(4) > 0)
    assert model.reward_baseline.tolist() == [-5.5, -2.5, -1.0, -0.5]  # a step never seen starts at its batch mean


def test_normalising_the_advantage_divides_the_policy_term_by_its_running_deviation():
    """With the advantage's running square set, the score-function gradient is the plain one over its root."""
    grads = {}
    for normalize in (False, True):
        model = hard_model(hard_attention_normalize_advantage=normalize)
        model.reward_baseline = torch.tensor(-3.0, dtype=torch.float64)
        model.advantage_variance = torch.tensor(4.0, dtype=torch.float64)
        torch.manual_seed(0)
        outputs = model(encoder_outputs=regions_for(model), labels=CAPTION, use_cache=False, sample_regions=True)
        grads[normalize] = gradient(model, outputs.attention_loss)
    torch.testing.assert_close(grads[True], grads[False] / 2)
    assert model.advantage_variance != 4.0  # moved by the batch


def test_sampled_batches_leave_their_attention_diagnostics():
    model = hard_model()
    torch.manual_seed(0)
    regions, labels = regions_for(model).repeat(8, 1, 1), CAPTION.repeat(8, 1)
    model(encoder_outputs=regions, labels=labels, use_cache=False, sample_regions=True)
    stats = model.hard_attention_stats
    assert set(stats) == {"attention_entropy", "peak_moves", "reward_std"}
    assert 0.5 < stats["attention_entropy"] < 1.001 and 0 <= stats["peak_moves"] <= 1 and stats["reward_std"] > 0
    weights = torch.tensor([[[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.5, 0.5]]])  # peaks 0, 1, 1; the 4th is padding
    targets = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    entropy = -(weights * weights.log()).sum(-1)
    stats = model.attention_diagnostics(weights, entropy, targets)
    assert stats["peak_moves"].item() == pytest.approx(0.5)  # one move in two pairs
    assert stats["attention_entropy"].item() == pytest.approx(entropy[0, :3].mean().item() / math.log(2))


def test_the_entropy_bonus_and_the_baseline_follow_the_config():
    model = hard_model(hard_attention_entropy_weight=0.5, hard_attention_reinforce_weight=0.0)
    regions = regions_for(model)
    torch.manual_seed(0)
    outputs = model(
        encoder_outputs=regions, labels=CAPTION, use_cache=False, sample_regions=True, output_attentions=True
    )
    weights = outputs.cross_attentions[0]
    entropy = -(weights * weights.log()).sum()
    torch.testing.assert_close(outputs.attention_loss, -0.5 * entropy / CAPTION.shape[1])
    log_likelihood = -outputs.token_loss.detach() * CAPTION.shape[1]  # the first batch starts the baseline
    torch.testing.assert_close(model.reward_baseline, log_likelihood)
    model(encoder_outputs=regions, labels=CAPTION, use_cache=False, sample_regions=False)
    torch.testing.assert_close(model.reward_baseline, log_likelihood)  # batches of expected context leave it


@pytest.mark.parametrize("expectation_prob,sampled", [(0.0, True), (1.0, False)])
def test_training_batches_sample_regions_unless_drawn_for_the_expectation(expectation_prob, sampled):
    model = hard_model(hard_attention_expectation_prob=expectation_prob, hard_attention_entropy_weight=0.1)
    outputs = model(encoder_outputs=regions_for(model), labels=CAPTION, use_cache=False)
    assert (outputs.attention_loss != 0).item() == sampled
    assert (model.reward_baseline is not None) == sampled


def test_generation_reads_the_expectation_unless_asked_to_sample_regions():
    """A hard-attention model captions deterministically (the expected context, SAT section 4.2) under any decoding;
    `sample_regions=True` draws the regions, beams and cache unchanged, and returns alpha as attention."""
    model = tiny_model(hard_attention=True).eval()
    soft = tiny_model(hard_attention=False).eval()  # the same weights (same seed): soft reading
    pixel_values = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    for num_beams in (1, 3):
        expected = soft.generate(pixel_values, num_beams=num_beams, max_new_tokens=6)
        assert torch.equal(model.generate(pixel_values, num_beams=num_beams, max_new_tokens=6), expected)
    torch.manual_seed(0)
    drawn = [model.generate(pixel_values, num_beams=3, max_new_tokens=6, sample_regions=True) for _ in range(4)]
    assert any(not torch.equal(d, expected) for d in drawn)
    out = model.generate(
        pixel_values, max_new_tokens=6, sample_regions=True, output_attentions=True, return_dict_in_generate=True
    )
    weights = torch.stack([step[:, -1] for step in out.cross_attentions], dim=1)  # (B, steps, k)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:2]))
    assert (weights < 1).all()  # alpha, not the one-hot reading


def test_chosen_regions_draw_in_proportion_to_the_weights():
    weights = torch.tensor([0.1, 0.6, 0.3]).expand(30000, 3)
    draws = chosen_regions(weights, torch.rand(30000, generator=torch.Generator().manual_seed(0)))
    frequencies = torch.bincount(draws, minlength=3) / 30000.0
    torch.testing.assert_close(frequencies, torch.tensor([0.1, 0.6, 0.3]), atol=0.015, rtol=0)
    assert chosen_regions(torch.tensor([0.5, 0.5]), torch.tensor(1.0)).item() == 1  # rounding never runs past k


@pytest.mark.slow
def test_a_hard_attention_sample_model_learns_the_drawn_shapes(tmp_path):
    """Trained through the train command's code path with hard attention, the captioner describes the sample set's
    test pictures far better than the best caption that ignores the picture (the training set's most common one),
    and its pointing accuracy on the drawn shapes is reported beside its chance level."""
    # lambda_r 1, the bound's own estimator: at the default 0.1 the policy term learns where to look ten times slower
    # and 6 epochs of this set end at CIDEr-D 0.91, under the bar below (Flickr8k's first epoch: 30.8 against 30.3)
    model_config = {
        **tiny_arguments(tmp_path).model,
        "grid_size": 3,
        "hard_attention": True,
        "hard_attention_reinforce_weight": 1.0,
    }
    args = tiny_arguments(
        tmp_path / "run", sample_sizes=[480, 24, 60], num_epochs=6, model=model_config, eval_num_beams=1
    )
    train(args)
    model = AutoModel.from_pretrained(tmp_path / "run" / "final")
    processor = AutoProcessor.from_pretrained(tmp_path / "run" / "final")
    assert model.config.hard_attention
    data = make_sample_dataset(*args.sample_sizes, seed=args.sample_seed, image_size=args.sample_image_size)
    test = data["test"]  # with the shapes' boxes, which training leaves out
    metrics = evaluate_split(model, processor, test, tmp_path / "eval", "test", meteor=False, max_new_tokens=12)
    common_caption = Counter(c for captions in data["train"]["captions"] for c in captions).most_common(1)[0][0]
    blind = score_captions([common_caption] * len(test), test["captions"], meteor=False)
    attention = metrics["attention"]
    print(
        f"hard attention on the sample test split: CIDEr-D {metrics['metrics']['cider']:.3f} vs "
        f"{blind['cider']:.3f} for the most common caption; pointing {attention['pointing_accuracy']:.3f} "
        f"(chance {attention['pointing_chance']:.3f}, {attention['pointing_nouns']} nouns)"
    )
    assert metrics["metrics"]["cider"] > 2 * blind["cider"] + 0.2
    assert metrics["metrics"]["bleu_4"] > blind["bleu_4"] + 0.1
