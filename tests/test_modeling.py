"""Behaviour of the model: cached decoding, generate(), attention, loss, encoder freezing, configuration errors."""

import copy
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import decode_step_by_step, images, tiny_config, tiny_model, token_ids
from transformers import ResNetConfig, ResNetForImageClassification

from hf_captioner import CaptionerCache, CaptionerConfig, CaptionerForConditionalGeneration, inference, packed_decoding
from hf_captioner.configuration_captioner import DECODER_IMPLEMENTATIONS
from hf_captioner.inference import speed_options
from hf_captioner.modeling_captioner import DECODER_RUNNERS, AdditiveScores, CaptionerDecoder
from hf_captioner.packed_decoding import update_cell

DECODER_KINDS = list(itertools.product(["lstm", "gru"], [True, False], ["additive", "dot", "scaled_dot"]))


@pytest.mark.parametrize("rnn_type,self_attention,cross_attention", DECODER_KINDS)
def test_cached_step_by_step_decoding_equals_teacher_forcing(rnn_type, self_attention, cross_attention):
    model = tiny_model(rnn_type=rnn_type, self_attention=self_attention, cross_attention=cross_attention)
    pixel_values, inputs = images(), token_ids()
    with torch.no_grad():
        full = model(pixel_values=pixel_values, decoder_input_ids=inputs, output_attentions=True)
    steps = decode_step_by_step(model, pixel_values, inputs)
    if self_attention:  # the last row of the full self-attention is what each step saw
        for t, out in enumerate(steps):
            assert torch.allclose(out.self_attentions[:, :, 0], full.self_attentions[:, :, t, : t + 1], atol=1e-6)
    cache = steps[-1].cache
    step_logits = [out.logits for out in steps]
    step_cross = [out.cross_attentions for out in steps]
    assert cache.get_seq_length() == inputs.shape[1]
    torch.testing.assert_close(torch.cat(step_logits, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(step_cross, dim=1), full.cross_attentions, atol=1e-6, rtol=1e-5)


GENERATE_MODES = {
    "greedy": dict(num_beams=1, do_sample=False),
    "beam": dict(num_beams=4, num_return_sequences=2, do_sample=False),
    "sample": dict(do_sample=True, top_k=10, num_return_sequences=2),
    "beam_sample": dict(do_sample=True, num_beams=3),
}


@pytest.mark.parametrize("mode", GENERATE_MODES)
def test_generate_with_cache_equals_without(mode):
    model = tiny_model(initializer_range=0.3)
    pixel_values = images()
    results = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        results.append(
            model.generate(pixel_values=pixel_values, max_new_tokens=8, use_cache=use_cache, **GENERATE_MODES[mode])
        )
    assert results[0].shape[0] == pixel_values.shape[0] * GENERATE_MODES[mode].get("num_return_sequences", 1)
    assert torch.equal(results[0], results[1])


def test_beam_search_depends_on_reordering_the_cache(monkeypatch):
    model = tiny_model(initializer_range=0.3)
    kwargs = dict(
        pixel_values=images(4), num_beams=4, max_new_tokens=8, output_scores=True, return_dict_in_generate=True
    )
    reordered = model.generate(**kwargs)
    monkeypatch.setattr(CaptionerCache, "reorder_cache", lambda self, beam_idx: None)
    not_reordered = model.generate(**kwargs)
    same_sequences = torch.equal(reordered.sequences, not_reordered.sequences)
    same_scores = torch.allclose(reordered.sequences_scores, not_reordered.sequences_scores)
    assert not (same_sequences and same_scores), "beam search gave the same result with a cache that is never reordered"


def test_one_beam_equals_a_hand_written_greedy_loop():
    model = tiny_model(initializer_range=0.3)
    pixel_values = images()
    generated = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6, suppress_tokens=None)
    ids = torch.full((pixel_values.shape[0], 1), model.config.decoder_start_token_id)
    finished = torch.zeros(pixel_values.shape[0], dtype=torch.bool)
    with torch.no_grad():
        for _ in range(6):
            next_ids = model(pixel_values=pixel_values, decoder_input_ids=ids).logits[:, -1].argmax(-1)
            next_ids = next_ids.masked_fill(finished, model.config.pad_token_id)
            finished |= next_ids == model.config.eos_token_id
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
            if finished.all():
                break
    assert torch.equal(generated, ids)


def test_attention_rows_sum_to_one_and_self_attention_is_causal():
    model = tiny_model()
    with torch.no_grad():
        out = model(pixel_values=images(), decoder_input_ids=token_ids(), output_attentions=True)
    batch, length = token_ids().shape
    assert out.cross_attentions.shape == (batch, length, 9)
    torch.testing.assert_close(out.cross_attentions.sum(-1), torch.ones(batch, length))
    assert out.self_attentions.shape == (batch, 2, length, length)
    torch.testing.assert_close(out.self_attentions.sum(-1), torch.ones(batch, 2, length))
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    assert (out.self_attentions[..., future] == 0).all()


@pytest.mark.parametrize("num_beams", [1, 3])
def test_caption_of_an_image_does_not_depend_on_the_rest_of_its_batch(num_beams):
    model = tiny_model(initializer_range=0.3)
    pixel_values = images(5)
    batched = model.generate(pixel_values=pixel_values, num_beams=num_beams, max_new_tokens=8)
    for i in range(5):
        alone = model.generate(pixel_values=pixel_values[i : i + 1], num_beams=num_beams, max_new_tokens=8)
        assert torch.equal(alone[0], batched[i, : alone.shape[1]])
        assert (batched[i, alone.shape[1] :] == model.config.pad_token_id).all()


def test_generate_returns_per_step_cross_attention_for_drawing():
    model = tiny_model()
    out = model.generate(
        pixel_values=images(2), num_beams=3, max_new_tokens=5, output_attentions=True, return_dict_in_generate=True
    )
    steps = out.sequences.shape[1] - 1
    assert len(out.cross_attentions) == steps
    for weights in out.cross_attentions:
        assert weights.shape == (2 * 3, 1, 9)
        torch.testing.assert_close(weights.sum(-1), torch.ones(6, 1))


def test_length_controls():
    model = tiny_model(initializer_range=0.3)
    eos = model.config.eos_token_id
    short = model.generate(pixel_values=images(), max_new_tokens=3, num_beams=1)
    assert short.shape[1] <= 1 + 3
    # forbid </s> for the first 6 words: every caption is then at least 6 words long
    long = model.generate(pixel_values=images(), min_new_tokens=6, max_new_tokens=10, num_beams=2)
    assert (long[:, 1:7] != eos).all()
    for penalty in (-2.0, 2.0):  # runs with either sign; shorter/longer preference is beam-search's business
        out = model.generate(pixel_values=images(), num_beams=3, length_penalty=penalty, max_new_tokens=6)
        assert out.shape[0] == 3


def test_generation_never_emits_padding_or_start_tokens():
    model = tiny_model(initializer_range=1.0)
    torch.manual_seed(0)
    out = model.generate(pixel_values=images(8), do_sample=True, max_new_tokens=12, temperature=3.0)
    for row in out[:, 1:]:
        words = row[row != model.config.pad_token_id]  # padding only after </s>
        assert model.config.bos_token_id not in words.tolist()
        ended = (row == model.config.eos_token_id).nonzero()
        if len(ended):
            assert (row[ended[0, 0] + 1 :] == model.config.pad_token_id).all()
        else:
            assert model.config.pad_token_id not in row.tolist()


def test_loss_is_cross_entropy_plus_the_reported_attention_penalty():
    model = tiny_model()
    labels = token_ids()
    labels[0, 4:] = -100  # padding
    out = model(pixel_values=images(), labels=labels)
    torch.testing.assert_close(out.loss, out.token_loss + out.attention_loss)
    real = (labels != -100)[..., None]
    attention = out_cross(model, labels).masked_fill(~real, 0)
    mean_map = attention.sum(1) / real.sum(1)  # each caption's mean attention over its own words
    regions = mean_map.shape[-1]
    chi_square = (regions * (mean_map - 1 / regions) ** 2).sum(-1)
    torch.testing.assert_close(out.attention_loss, model.config.attention_penalty * chi_square.mean())
    paper = tiny_model(attention_penalty_form="doubly_stochastic")(pixel_values=images(), labels=labels)
    torch.testing.assert_close(paper.attention_loss, ((1 - attention.sum(1)) ** 2).sum(-1).mean())
    # padding is ignored: the padded caption alone gives the loss of its unpadded prefix
    alone = model(pixel_values=images()[:1], labels=labels[:1, :4])
    padded = model(pixel_values=images()[:1], labels=labels[:1])
    torch.testing.assert_close(alone.token_loss, padded.token_loss)
    torch.testing.assert_close(alone.attention_loss, padded.attention_loss)
    no_penalty = tiny_model(attention_penalty=0.0)(pixel_values=images(), labels=labels)
    assert no_penalty.attention_loss.item() == 0.0
    smoothed = tiny_model(label_smoothing=0.2)(pixel_values=images(), labels=labels)
    assert not torch.isclose(smoothed.token_loss, out.token_loss)


def test_the_coverage_penalty_weighs_the_same_attention_alike_on_any_grid():
    """Uniform coverage costs nothing, and splitting every region of a 2 x 2 grid into a 4 x 4 one (each quarter
    getting a quarter of the mass) leaves the penalty unchanged, so lambda does not need retuning per grid."""
    model = tiny_model(attention_penalty=1.0)
    words = torch.ones(1, 3, dtype=torch.bool)
    uniform = torch.full((1, 3, 4), 0.25)
    assert model.attention_penalty(uniform, words).item() == pytest.approx(0.0, abs=1e-6)
    coarse = torch.softmax(torch.randn(1, 3, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    fine = (coarse.view(1, 3, 2, 1, 2, 1) / 4).expand(1, 3, 2, 2, 2, 2).reshape(1, 3, 16)
    torch.testing.assert_close(model.attention_penalty(fine, words), model.attention_penalty(coarse, words))
    one_region = torch.zeros(1, 3, 4)
    one_region[..., 0] = 1.0
    assert model.attention_penalty(one_region, words).item() == pytest.approx(3.0)  # k - 1: every word on one region
    paper = tiny_model(attention_penalty_form="doubly_stochastic")
    assert paper.attention_penalty(fine, words) != pytest.approx(paper.attention_penalty(coarse, words).item())


def out_cross(model, labels):
    with torch.no_grad():
        return model(pixel_values=images(), labels=labels, output_attentions=True).cross_attentions


def test_a_tiny_model_overfits_a_handful_of_image_caption_pairs():
    torch.manual_seed(0)
    model = CaptionerForConditionalGeneration(tiny_config(hidden_size=32, embed_dim=32, attention_dim=16)).train()
    pixel_values = images(4, seed=5)
    captions = torch.tensor([[5, 6, 7, 2, -100], [8, 9, 10, 11, 2], [6, 5, 2, -100, -100], [12, 13, 14, 15, 2]])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(pixel_values=pixel_values, labels=captions).token_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    assert model(pixel_values=pixel_values, labels=captions).token_loss.item() < 0.05
    generated = model.generate(pixel_values=pixel_values, num_beams=1, max_new_tokens=6)
    for row, target in zip(generated, captions, strict=True):
        target = target[target != -100]
        assert row[1 : 1 + len(target)].tolist() == target.tolist()


def test_frozen_encoder_gets_no_gradient_and_keeps_batchnorm_statistics():
    model = tiny_model().train()
    assert all(not p.requires_grad for p in model.encoder.parameters())
    norms = [m for m in model.encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(not m.training for m in norms)
    before = [m.running_mean.clone() for m in norms]
    model(pixel_values=images(), labels=token_ids()).loss.backward()
    assert all(torch.equal(b, m.running_mean) for b, m in zip(before, norms, strict=True))
    assert model.decoder.lm_head.weight.grad is not None


@pytest.mark.parametrize(
    "stages,trainable_prefixes", [(1, ["encoder.stages.1."]), (2, ["encoder.stages."]), (-1, [""])]
)
def test_encoder_trainable_stages(stages, trainable_prefixes):
    model = tiny_model(encoder_trainable_stages=stages).train()
    for name, param in model.encoder.backbone.named_parameters():
        assert param.requires_grad == any(name.startswith(p) for p in trainable_prefixes), name
    model(pixel_values=images(), labels=token_ids()).loss.backward()
    grads = [p.grad for p in model.encoder.backbone.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_from_vision_pretrained_starts_from_the_saved_backbone(tmp_path):
    torch.manual_seed(3)
    vision = ResNetForImageClassification(
        ResNetConfig(layer_type="basic", embedding_size=8, depths=[1, 1], hidden_sizes=[8, 16])
    )
    vision.save_pretrained(tmp_path / "backbone")
    model = CaptionerForConditionalGeneration.from_vision_pretrained(
        str(tmp_path / "backbone"), vocab_size=40, hidden_size=16, embed_dim=16, attention_dim=8, self_attention_heads=2
    )
    saved = vision.resnet.state_dict()
    loaded = model.encoder.backbone.state_dict()
    assert loaded.keys() <= saved.keys()
    for key in loaded:
        assert torch.equal(saved[key], loaded[key]), key
    assert model.config.hidden_size == 16 and model.encoder.num_channels == 16


def test_tied_embeddings_share_one_matrix_through_save_and_load(tmp_path):
    model = tiny_model(tie_word_embeddings=True)
    assert model.decoder.lm_head.weight is model.decoder.embed_tokens.weight
    model.save_pretrained(tmp_path)
    loaded = CaptionerForConditionalGeneration.from_pretrained(tmp_path)
    assert loaded.decoder.lm_head.weight is loaded.decoder.embed_tokens.weight
    torch.testing.assert_close(loaded.decoder.lm_head.weight, model.decoder.lm_head.weight)


@pytest.mark.parametrize(
    "field,value",
    [
        ("rnn_type", "transformer"),
        ("cross_attention", "multiplicative"),
        ("hidden_size", 0),
        ("self_attention_heads", 5),
        ("dropout", 1.5),
        ("label_smoothing", -0.1),
        ("attention_penalty", -1.0),
        ("attention_penalty_form", "l2"),
        ("attention_supervision_weight", -0.5),
        ("decoder_type", "transformer"),
        ("region_encoder_layers", -1),
        ("hard_attention_entropy_weight", -0.1),
        ("hard_attention_expectation_prob", 1.5),
        ("hard_attention_reward", "word"),
        ("hard_attention_baseline", "greedy"),
        ("encoder_trainable_stages", 7),
        ("pad_token_id", 40),
        ("grid_size", 2.5),
        ("vision_config", {"model_type": "bert"}),
    ],
)
def test_bad_config_values_raise_a_clear_error_at_construction(field, value):
    with pytest.raises(ValueError, match=field if field != "vision_config" else "backbone"):
        tiny_config(**{field: value})


def test_missing_inputs_raise_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="pixel_values"):
        model(decoder_input_ids=token_ids())
    with pytest.raises(ValueError, match="labels"):
        model(pixel_values=images())


def test_default_configuration_is_show_attend_and_tell_sized():
    config = CaptionerConfig()
    assert config.vision_config.depths == [3, 4, 23, 3]  # ResNet-101
    assert (config.grid_size, config.embed_dim, config.hidden_size, config.attention_dim) == (14, 512, 512, 512)
    assert config.rnn_type == "lstm" and config.cross_attention == "additive" and config.self_attention


@pytest.mark.parametrize(
    "rnn_type,self_attention,cross_attention,hard_attention",
    [("lstm", True, "additive", False), ("gru", False, "dot", False), ("lstm", True, "scaled_dot", True)],
)
def test_packed_teacher_forcing_equals_the_reference_decoder(rnn_type, self_attention, cross_attention, hard_attention):
    """The packed runner (length-packed steps, deferred weight gradients, no vocabulary projection of padding)
    changes nothing but the work: in training mode, the same losses, logits and attention on every real position, and
    the same gradients, frozen weights included; with hard attention, the same regions drawn from the same noise, and
    the same dropout masks from the same seed."""
    model = tiny_model(
        rnn_type=rnn_type,
        self_attention=self_attention,
        cross_attention=cross_attention,
        hard_attention=hard_attention,
        dropout=0.5,
    ).train()
    model.decoder.cross_attention.gate.weight.requires_grad_(False)  # a frozen step weight gets no gradient
    labels = token_ids(batch=4, length=8)
    labels[0, 3:] = -100  # captions of 3, 7, 5 and 1 tokens, in no particular order,
    labels[1, 7:] = -100  # padded one step beyond the longest
    labels[2, 5:] = -100
    labels[3, 1:] = -100
    outputs, grads = {}, {}
    for implementation in ("packed", "reference"):
        model.config.decoder_implementation = implementation
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same noise draws the regions
        model.reward_baseline = None
        outputs[implementation] = model(
            pixel_values=images(4),
            labels=labels,
            use_cache=False,
            output_attentions=True,
            sample_regions=hard_attention,
        )
        outputs[implementation].loss.backward()
        grads[implementation] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    packed, reference = outputs["packed"], outputs["reference"]
    torch.testing.assert_close(packed.token_loss, reference.token_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.attention_loss, reference.attention_loss, rtol=1e-6, atol=1e-6)
    real = labels != -100
    torch.testing.assert_close(packed.logits[real], reference.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.cross_attentions[real], reference.cross_attentions[real], rtol=1e-5, atol=1e-6)
    assert (packed.cross_attentions[~real] == 0).all() and (packed.logits[~real] == 0).all()
    if self_attention:  # (B, heads, T, T) -> the real (B, T) positions
        per_step = [attention.self_attentions.transpose(1, 2)[real] for attention in (packed, reference)]
        torch.testing.assert_close(*per_step, rtol=1e-5, atol=1e-6)
    assert grads["packed"].keys() == grads["reference"].keys()
    assert "decoder.cell.weight_ih" in grads["packed"] and "decoder.cross_attention.gate.weight" not in grads["packed"]
    for name in grads["packed"]:
        # the exact gradient of the score bias, and of the region bias under dot scoring, is 0 (softmax ignores a
        # shift of all scores): what they get is rounding
        shifts_all_scores = name.endswith("score.bias") or (
            cross_attention != "additive" and "region_proj.bias" in name
        )
        atol = 1e-7 if shifts_all_scores else 1e-9
        torch.testing.assert_close(grads["packed"][name], grads["reference"][name], rtol=1e-4, atol=atol, msg=name)


def test_a_second_backward_through_the_packed_decoder_says_what_to_use():
    """The packed runner frees its step inputs in the first backward: a second one (retain_graph) stops with a
    message naming the reference decoder, which takes it."""
    model = tiny_model().train()
    params = [p for p in model.decoder.parameters() if p.requires_grad]
    for implementation in ("packed", "reference"):
        model.config.decoder_implementation = implementation
        loss = model(pixel_values=images(), labels=token_ids(), use_cache=False).loss
        torch.autograd.grad(loss, params, retain_graph=True)
        if implementation == "packed":
            with pytest.raises(RuntimeError, match="decoder_implementation='reference'"):
                torch.autograd.grad(loss, params)
        else:
            torch.autograd.grad(loss, params)


@pytest.mark.parametrize("weight_first", [True, False])
@pytest.mark.parametrize("rnn_type,self_attention,cross_attention", DECODER_KINDS)
def test_packed_inference_step_equals_the_reference_step(
    rnn_type, self_attention, cross_attention, weight_first, monkeypatch
):
    """Inference runs the stacked products (`packed_step`): the same logits and attention at every cached step and the
    same beam-search captions as the reference step, whichever way round this CPU multiplies a few rows."""
    monkeypatch.setattr(packed_decoding, "weight_first_pays", lambda: weight_first)  # one CPU's probe or another's
    model = tiny_model(
        rnn_type=rnn_type, self_attention=self_attention, cross_attention=cross_attention, initializer_range=0.3
    )
    pixel_values, inputs = images(), token_ids()
    outputs, captions = {}, {}
    with torch.no_grad():
        for implementation in ("packed", "reference"):
            model.config.decoder_implementation = implementation
            outputs[implementation] = model(
                pixel_values=pixel_values, decoder_input_ids=inputs, use_cache=True, output_attentions=True
            )
            captions[implementation] = model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=8)
    packed, reference = outputs["packed"], outputs["reference"]
    assert packed.cache.products is not None and reference.cache.products is None
    torch.testing.assert_close(packed.logits, reference.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.cross_attentions, reference.cross_attentions, rtol=1e-5, atol=1e-6)
    if self_attention:
        torch.testing.assert_close(packed.self_attentions, reference.self_attentions, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(packed.cache.keys, reference.cache.keys, rtol=1e-5, atol=1e-6)
    assert torch.equal(captions["packed"], captions["reference"])


def test_generation_follows_the_weights_after_a_fused_optimizer_step():
    """Captions come from the current weights: a fused AdamW step (which updates parameters in place without moving
    their version counters) between two generate() calls changes the second one's stacked products."""
    model = tiny_model(initializer_range=0.3)
    before = model.generate(pixel_values=images(), num_beams=3, max_new_tokens=6, return_dict_in_generate=True)
    optimizer = torch.optim.AdamW([model.decoder.lm_head.bias], lr=50.0, fused=True)
    model.decoder.lm_head.bias.grad = torch.zeros_like(model.decoder.lm_head.bias)
    model.decoder.lm_head.bias.grad[5] = -1.0  # the step raises token 5's bias by about lr
    optimizer.step()
    after = model.generate(pixel_values=images(), num_beams=3, max_new_tokens=6, return_dict_in_generate=True)
    assert after.cache.products is not before.cache.products
    assert (after.sequences[:, 1:] == 5).all() and not (before.sequences[:, 1:] == 5).all()
    model.config.decoder_implementation = "reference"
    assert torch.equal(after.sequences, model.generate(pixel_values=images(), num_beams=3, max_new_tokens=6))


def test_every_configurable_decoder_implementation_has_a_runner():
    assert set(DECODER_RUNNERS) == set(DECODER_IMPLEMENTATIONS)


class DoubledContextDecoder(CaptionerDecoder):
    """A decoder variant as a contributor adds one: its own reference step, no packed step."""

    def step(self, embedded, regions, cache, noise=None):
        context, cross_weights, self_weights = super().step(embedded, regions, cache, noise)
        return 2 * context, cross_weights, self_weights


def test_a_decoder_variant_without_a_packed_step_runs_its_own_step_under_packed():
    """A new decoder class needs no edit of packed_decoding.py: under "packed" it trains and generates with its
    reference step (same loss, gradients and captions as "reference"), and no stacked products are made for it."""
    model = tiny_model(initializer_range=0.3)
    variant = DoubledContextDecoder(model.config, region_dim=model.encoder.num_channels)
    variant.load_state_dict(model.decoder.state_dict())
    model.decoder = variant
    labels, losses, grads, captions = token_ids(batch=3, length=6), {}, {}, {}
    for implementation in ("packed", "reference"):
        model.config.decoder_implementation = implementation
        model.zero_grad(set_to_none=True)
        losses[implementation] = model(pixel_values=images(), labels=labels, use_cache=False).loss
        losses[implementation].backward()
        grads[implementation] = variant.cell.weight_ih.grad
        with torch.no_grad():
            cached = model(pixel_values=images(), decoder_input_ids=labels, use_cache=True)
            assert cached.cache.products is None
            captions[implementation] = model.generate(pixel_values=images(), num_beams=3, max_new_tokens=6)
    assert torch.equal(losses["packed"], losses["reference"]) and torch.equal(grads["packed"], grads["reference"])
    assert torch.equal(captions["packed"], captions["reference"])
    model.decoder = CaptionerDecoder(model.config, region_dim=model.encoder.num_channels)  # the same weights, the
    model.decoder.load_state_dict(variant.state_dict())  # step it changed: the variant's loss was its own
    model.config.decoder_implementation = "packed"
    assert not torch.allclose(model(pixel_values=images(), labels=labels, use_cache=False).loss, losses["packed"])


@pytest.mark.parametrize("cross_attention", ["additive", "dot"])
def test_beam_scores_are_the_teacher_forced_log_likelihood_of_the_returned_captions(cross_attention):
    """The beams of an image share one copy of its regions; scoring the returned captions one row per caption
    (teacher forcing) must give the scores beam search reported."""
    model = tiny_model(initializer_range=0.3, cross_attention=cross_attention)
    pixel_values = images(3)
    out = model.generate(
        pixel_values=pixel_values,
        num_beams=3,
        num_return_sequences=3,
        length_penalty=0.0,
        max_new_tokens=6,
        output_scores=True,
        return_dict_in_generate=True,
    )
    sequences = out.sequences
    with torch.no_grad():
        logits = model(
            pixel_values=pixel_values.repeat_interleave(3, dim=0), decoder_input_ids=sequences[:, :-1]
        ).logits
    log_probs = logits.log_softmax(-1).gather(-1, sequences[:, 1:, None]).squeeze(-1)
    real = sequences[:, 1:] != model.config.pad_token_id  # pad only ever follows </s>
    torch.testing.assert_close((log_probs * real).sum(-1), out.sequences_scores, atol=1e-4, rtol=1e-4)


def test_generate_leaves_the_callers_encoder_outputs_as_they_were():
    model = tiny_model()
    encoder_outputs = model.encoder(images(2))
    before = encoder_outputs.last_hidden_state.clone()
    for _ in range(2):
        sequences = model.generate(encoder_outputs=encoder_outputs, num_beams=3, max_new_tokens=4)
        assert sequences.shape[0] == 2
    assert torch.equal(encoder_outputs.last_hidden_state, before)


def test_cache_is_taken_under_its_name_before_transformers_5_24_too():
    """Model folders saved with this code run under the user's transformers: older versions pass the cache to
    `forward` as `past_key_values`, 5.24 and later as `cache`; both continue decoding the same way."""
    model = tiny_model()
    pixel_values, inputs = images(), token_ids()
    with torch.no_grad():
        first = model(pixel_values=pixel_values, decoder_input_ids=inputs[:, :3], use_cache=True)
        state = copy.deepcopy(first.cache)
        new_name = model(pixel_values=pixel_values, decoder_input_ids=inputs[:, 3:], cache=first.cache)
        old_name = model(pixel_values=pixel_values, decoder_input_ids=inputs[:, 3:], past_key_values=state)
        full = model(pixel_values=pixel_values, decoder_input_ids=inputs)
    assert torch.equal(new_name.logits, old_name.logits)
    torch.testing.assert_close(new_name.logits, full.logits[:, 3:], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        model(pixel_values=pixel_values, decoder_input_ids=inputs[:, 3:], cache=state, past_key_values=state)


def test_beams_may_not_move_to_another_image():
    model = tiny_model()
    with torch.no_grad():
        out = model(pixel_values=images(2), decoder_input_ids=token_ids(6, 1), use_cache=True)
    out.cache.reorder_cache(torch.tensor([2, 0, 1, 3, 3, 5]))  # within each image's three rows: fine
    with pytest.raises(ValueError, match="its own image"):
        out.cache.reorder_cache(torch.tensor([0, 1, 3, 3, 4, 5]))


def test_additive_scores_equal_autograd_through_tanh():
    """The additive attention's own autograd function (tanh through a sigmoid, a hand-written backward) gives the
    values and gradients of v^T tanh(p + q) written plainly, and passes torch's numerical gradient check."""
    generator = torch.Generator().manual_seed(0)
    regions, query, v = (
        torch.randn(*shape, dtype=torch.double, generator=generator, requires_grad=True)
        for shape in [(2, 5, 4), (2, 3, 4), (4,)]
    )
    ours = AdditiveScores.apply(regions, query, v)
    plain = torch.tanh(regions.unsqueeze(1) + query.unsqueeze(2)) @ v  # (2, 3, 5)
    torch.testing.assert_close(ours, plain)
    upstream = torch.randn(plain.shape, dtype=torch.double, generator=generator)
    for ours_grad, plain_grad in zip(
        torch.autograd.grad(ours, (regions, query, v), upstream),
        torch.autograd.grad(plain, (regions, query, v), upstream),
        strict=True,
    ):
        torch.testing.assert_close(ours_grad, plain_grad)
    assert torch.autograd.gradcheck(AdditiveScores.apply, (regions, query, v))


@pytest.mark.parametrize("rnn_type", ["lstm", "gru"])
def test_written_out_recurrence_equals_the_torch_cell(rnn_type):
    decoder = tiny_model(rnn_type=rnn_type).decoder
    generator = torch.Generator().manual_seed(0)
    cell_input = torch.randn(5, decoder.cell.input_size, generator=generator)
    hidden, cell = torch.randn(2, 5, decoder.cell.hidden_size, generator=generator)
    cache = CaptionerCache(hidden, cell if rnn_type == "lstm" else None, None, None, torch.zeros(5, 1, 1))
    cell_params = decoder.cell
    update_cell(
        F.linear(cell_input, cell_params.weight_ih, cell_params.bias_ih),
        F.linear(hidden, cell_params.weight_hh, cell_params.bias_hh),
        cache,
    )
    expected = decoder.cell(cell_input, (hidden, cell) if rnn_type == "lstm" else hidden)
    if rnn_type == "lstm":
        torch.testing.assert_close(cache.cell, expected[1])
        expected = expected[0]
    torch.testing.assert_close(cache.hidden, expected)


def test_bf16_autocast_trains_with_float32_gradients_close_to_float32_ones():
    model = tiny_model(dropout=0.0)
    labels = token_ids(batch=4, length=7)
    labels[2, 3:] = -100
    grads = []
    for enabled in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=enabled):
            loss = model(pixel_values=images(4), labels=labels, use_cache=False).loss
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.decoder.parameters() if p.grad is not None]))
    assert grads[0].dtype == torch.float32
    assert F.cosine_similarity(grads[0], grads[1], dim=0) > 0.99


@pytest.mark.parametrize("has_instructions", [True, False])
def test_bf16_is_warned_about_on_a_cpu_without_bf16_instructions(monkeypatch, caplog, has_instructions):
    """Without AVX512-BF16/AMX torch's bf16 products are hundreds of times slower: asking for them says so."""
    monkeypatch.setattr(inference, "cpu_multiplies_bf16_fast", lambda: has_instructions)
    with caplog.at_level(logging.WARNING, logger="hf_captioner.inference"):
        speed_options(tiny_model(), bf16=True)
    assert ("no bfloat16 matrix instructions" in caplog.text) is not has_instructions


def test_precision_auto_is_bf16_only_where_the_probe_says_it_pays(monkeypatch):
    """`--precision auto` (captioning, the app) and `mixed_precision: auto` (training): never bf16 on a CPU without
    bfloat16 instructions (no probe is run there); with them, the probe's verdict."""
    cpu = torch.device("cpu")
    inference.bf16_pays.cache_clear()
    monkeypatch.setattr(inference, "cpu_multiplies_bf16_fast", lambda: False)
    assert not inference.use_bf16("auto", cpu) and not inference.use_bf16("float32", cpu)
    assert inference.use_bf16("bf16", cpu)  # asked for: it is what the user gets (with a warning)
    inference.bf16_pays.cache_clear()
    monkeypatch.setattr(inference, "cpu_multiplies_bf16_fast", lambda: True)
    monkeypatch.setattr(inference.time, "perf_counter", iter(range(0, 100, 2)).__next__)  # bf16 and float32 tie
    assert not inference.use_bf16("auto", cpu)  # a tie is not worth bf16's rounding
    inference.bf16_pays.cache_clear()
    with pytest.raises(ValueError, match="precision must be one of"):
        inference.use_bf16("fp8", cpu)


def test_compiled_decoder_step_captions_as_the_eager_one():
    model = tiny_model(initializer_range=0.3)
    kwargs = dict(pixel_values=images(3), num_beams=3, max_new_tokens=6)
    eager = model.generate(**kwargs)
    speed_options(model, compile_step=True)
    assert torch.equal(model.generate(**kwargs), eager)


def test_channels_last_encoder_gives_the_same_captions_and_logits():
    model = tiny_model(initializer_range=0.3)
    pixel_values, inputs = images(), token_ids()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=inputs).logits
        captions = model.generate(pixel_values=pixel_values, max_new_tokens=6)
        speed_options(model, channels_last=True)
        conv = next(m for m in model.encoder.modules() if isinstance(m, torch.nn.Conv2d))
        assert conv.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(pixel_values=pixel_values, decoder_input_ids=inputs).logits, logits)
        assert torch.equal(model.generate(pixel_values=pixel_values, max_new_tokens=6), captions)


def test_inference_reuses_a_scratch_buffer_and_matches_the_gradient_path():
    model = tiny_model(initializer_range=0.3)
    pixel_values, inputs = images(), token_ids()
    with_grad = model(pixel_values=pixel_values, decoder_input_ids=inputs, use_cache=True)
    with torch.no_grad():
        without = model(pixel_values=pixel_values, decoder_input_ids=inputs, use_cache=True)
    assert with_grad.cache._scratch is None and without.cache._scratch is not None
    torch.testing.assert_close(without.logits, with_grad.logits.detach())
