"""The decoder variants (region self-attention, the top-down decoder, the visual sentinel) and attention supervision:
each keeps the model's invariants, and the loss that supervises attention is what it says."""

import pytest
import torch
from conftest import TINY_CAPTIONS, decode_step_by_step, images, tiny_config, tiny_model, token_ids
from PIL import Image

from hf_captioner import (
    CaptionerCache,
    CaptionerForConditionalGeneration,
    CaptionerImageProcessor,
    CaptionerProcessor,
    caption_with_attention,
    plot_attention,
    train_tokenizer,
)
from hf_captioner.modeling_captioner import CaptionerRegionEncoder, TopDownDecoder
from hf_captioner.visualize import panel_axes

# (decoder_type, visual_sentinel, region_encoder_layers, rnn_type, self_attention)
VARIANTS = [
    ("show_attend_tell", False, 1, "lstm", True),
    ("show_attend_tell", True, 0, "lstm", True),
    ("show_attend_tell", True, 0, "gru", False),
    ("top_down", False, 0, "lstm", True),
    ("top_down", False, 0, "gru", False),
    ("top_down", True, 2, "lstm", True),
]
VARIANT_IDS = ["regions", "sentinel", "sentinel-gru", "top_down", "top_down-gru", "top_down-sentinel-regions"]


def variant(decoder_type, sentinel, layers, rnn_type, self_attention, **overrides) -> CaptionerForConditionalGeneration:
    return tiny_model(
        decoder_type=decoder_type,
        visual_sentinel=sentinel,
        region_encoder_layers=layers,
        rnn_type=rnn_type,
        self_attention=self_attention,
        initializer_range=0.3,
        **overrides,
    )


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_cached_step_by_step_decoding_equals_teacher_forcing(settings):
    model = variant(*settings)
    pixel_values, inputs = images(), token_ids()
    with torch.no_grad():
        full = model(pixel_values=pixel_values, decoder_input_ids=inputs, output_attentions=True)
    steps = decode_step_by_step(model, pixel_values, inputs)
    logits = [out.logits for out in steps]
    cross = [out.cross_attentions for out in steps]
    sentinel = [out.sentinel_attentions for out in steps]
    torch.testing.assert_close(torch.cat(logits, dim=1), full.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat(cross, dim=1), full.cross_attentions, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        full.cross_attentions.sum(-1), torch.ones(inputs.shape)
    )  # the image's share, renormalised
    if settings[1]:
        torch.testing.assert_close(torch.cat(sentinel, dim=1), full.sentinel_attentions, atol=1e-6, rtol=1e-5)
        assert ((full.sentinel_attentions > 0) & (full.sentinel_attentions < 1)).all()
    else:
        assert full.sentinel_attentions is None


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_packed_runner_equals_the_reference_for_every_variant(settings):
    """Loss, logits, attention and every gradient agree between the runners (the packed steps of the Show, Attend and
    Tell and the top-down decoders, with the region encoder or the sentinel)."""
    model = variant(*settings).train()
    labels = token_ids(batch=4, length=8)
    labels[0, 3:] = -100
    labels[2, 5:] = -100
    results = {}
    for implementation in ("packed", "reference"):
        model.config.decoder_implementation = implementation
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout masks (the region encoder's layers)
        out = model(pixel_values=images(4), labels=labels, use_cache=False, output_attentions=True)
        out.loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        results[implementation] = out, grads
    (packed, packed_grads), (reference, reference_grads) = results["packed"], results["reference"]
    real = labels != -100
    torch.testing.assert_close(packed.loss, reference.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed.logits[real], reference.logits[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.cross_attentions[real], reference.cross_attentions[real], rtol=1e-5, atol=1e-6)
    assert packed_grads.keys() == reference_grads.keys()
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_packed_inference_equals_the_reference_for_every_variant(settings):
    """Cached inference steps (stacked products: the Show, Attend and Tell and the top-down decoders, with or without
    the sentinel) give the reference's logits, attention and beam-search captions."""
    model = variant(*settings)
    outputs, captions = {}, {}
    with torch.no_grad():
        for implementation in ("packed", "reference"):
            model.config.decoder_implementation = implementation
            outputs[implementation] = model(
                pixel_values=images(), decoder_input_ids=token_ids(), use_cache=True, output_attentions=True
            )
            captions[implementation] = model.generate(pixel_values=images(), num_beams=3, max_new_tokens=8)
    packed, reference = outputs["packed"], outputs["reference"]
    assert packed.cache.products is not None  # every variant has a packed step
    torch.testing.assert_close(packed.logits, reference.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed.cross_attentions, reference.cross_attentions, rtol=1e-5, atol=1e-6)
    if settings[1]:
        torch.testing.assert_close(packed.sentinel_attentions, reference.sentinel_attentions, rtol=1e-5, atol=1e-6)
    assert torch.equal(captions["packed"], captions["reference"])


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_captions_do_not_depend_on_the_batch_and_beam_search_reorders_every_state(settings):
    model = variant(*settings)
    pixel_values = images(4)
    batched = model.generate(pixel_values=pixel_values, num_beams=3, max_new_tokens=8)
    for i in range(4):
        alone = model.generate(pixel_values=pixel_values[i : i + 1], num_beams=3, max_new_tokens=8)
        assert torch.equal(alone[0], batched[i, : alone.shape[1]])
    # every per-row state follows its beam
    with torch.no_grad():
        out = model(pixel_values=images(1), decoder_input_ids=token_ids(batch=3, length=2), use_cache=True)
    cache = out.cache
    before = {name: getattr(cache, name) for name in CaptionerCache.STATES if getattr(cache, name) is not None}
    assert ("attention_hidden" in before) == (settings[0] == "top_down")
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for name, tensor in before.items():
        assert torch.equal(getattr(cache, name), tensor[[2, 0, 0]]), name


@pytest.mark.parametrize("settings", VARIANTS, ids=VARIANT_IDS)
def test_save_and_load_give_identical_logits(settings, tmp_path):
    model = variant(*settings)
    model.save_pretrained(tmp_path)
    loaded = CaptionerForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert type(loaded.decoder) is type(model.decoder)
    with torch.no_grad():
        before = model(pixel_values=images(), decoder_input_ids=token_ids()).logits
        after = loaded(pixel_values=images(), decoder_input_ids=token_ids()).logits
    assert torch.equal(before, after)


def test_region_encoder_runs_once_per_image_in_generation_and_reads_cached_features():
    """The refined regions ride in the cache: a beam search runs the region encoder once, not once per step; and it
    works from the encoder's (cached) output, which stays what it was."""
    model = variant("show_attend_tell", False, 1, "lstm", True)
    calls = []
    model.region_encoder.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    features = model.encoder(images(2)).last_hidden_state  # (2, 9, C): what a feature store holds
    from_features = model.generate(encoder_outputs=features, num_beams=3, max_new_tokens=6)
    assert calls == [torch.Size([2, 9, model.config.hidden_size])]
    assert features.shape[-1] == model.encoder.num_channels
    assert torch.equal(from_features, model.generate(pixel_values=images(2), num_beams=3, max_new_tokens=6))


def test_region_encoder_lets_a_region_see_the_others_and_knows_where_each_cell_is():
    encoder = CaptionerRegionEncoder(tiny_config(region_encoder_layers=1), region_dim=16).eval()
    regions = torch.randn(1, 9, 16)
    changed = regions.clone()
    changed[0, 8] += 1.0  # only the last region changes
    with torch.no_grad():
        out, out_changed = encoder(regions), encoder(changed)
        same_everywhere = encoder(torch.ones(1, 9, 16))
    assert not torch.allclose(out[0, 0], out_changed[0, 0])  # the first region's output saw the last one
    assert not torch.allclose(same_everywhere[0, 0], same_everywhere[0, 1])  # identical features, other cells


def test_top_down_decoder_queries_the_regions_from_its_attention_lstm():
    model = variant("top_down", False, 0, "lstm", True).train()
    assert isinstance(model.decoder, TopDownDecoder)
    loss = model(pixel_values=images(), labels=token_ids(), use_cache=False).loss
    loss.backward()
    assert model.decoder.attention_cell.weight_ih.grad.abs().sum() > 0
    assert model.decoder.init_attention_hidden.weight.grad.abs().sum() > 0
    with torch.no_grad():
        out = model.eval()(pixel_values=images(), decoder_input_ids=token_ids(length=2), use_cache=True)
    assert out.cache.attention_hidden.shape == out.cache.hidden.shape == (3, model.config.hidden_size)


def test_a_sentinel_that_takes_all_the_attention_leaves_the_picture_out():
    """With the sentinel's score far above the regions', the words no longer depend on the regions beyond their mean
    (which sets the initial state), and `sentinel_attentions` reports a share of 1."""
    model = variant("show_attend_tell", True, 0, "lstm", True, cross_attention="dot")
    inputs = token_ids()
    regions = torch.randn(3, 9, model.encoder.num_channels, generator=torch.Generator().manual_seed(0))
    shuffle = torch.randn(regions.shape, generator=torch.Generator().manual_seed(1))
    same_mean = regions + shuffle - shuffle.mean(dim=1, keepdim=True)  # other regions, the same mean region
    with torch.no_grad():
        normal = model(encoder_outputs=regions, decoder_input_ids=inputs, output_attentions=True)
        assert not torch.allclose(normal.logits, model(encoder_outputs=same_mean, decoder_input_ids=inputs).logits)
        scores = model.decoder.cross_attention.scores  # the sentinel is the only key of its own scoring call
        model.decoder.cross_attention.scores = lambda query, keys, scratch=None: (
            scores(query, keys, scratch) + (1e4 if keys.shape[1] == 1 else 0.0)
        )
        blind = model(encoder_outputs=regions, decoder_input_ids=inputs, output_attentions=True)
        blind_same_mean = model(encoder_outputs=same_mean, decoder_input_ids=inputs)
    assert (normal.sentinel_attentions < 0.99).all()
    torch.testing.assert_close(blind.sentinel_attentions, torch.ones(inputs.shape))
    torch.testing.assert_close(blind.logits, blind_same_mean.logits)


def test_hard_attention_and_the_sentinel_are_refused_together():
    with pytest.raises(ValueError, match="hard_attention.*visual_sentinel|visual_sentinel.*hard_attention"):
        tiny_config(hard_attention=True, visual_sentinel=True)


def test_supervision_loss_is_the_cross_entropy_of_the_target_cells_under_the_attention():
    model = tiny_model(attention_supervision_weight=0.5, attention_penalty=0.0)
    labels = token_ids(batch=2, length=4)
    targets = torch.zeros(2, 4, 9)
    targets[0, 1, [0, 1]] = 1.0  # word 1 of caption 0 names what covers cells 0 and 1
    targets[1, 3, 4] = 1.0
    with torch.no_grad():
        out = model(pixel_values=images(2), labels=labels, attention_targets=targets, output_attentions=True)
        plain = model(pixel_values=images(2), labels=labels, output_attentions=True)
    alpha = out.cross_attentions
    expected = -(0.5 * alpha[0, 1, [0, 1]].log().sum() + alpha[1, 3, 4].log()) / 2
    torch.testing.assert_close(out.supervision_loss, 0.5 * expected)
    torch.testing.assert_close(out.loss, out.token_loss + out.attention_loss + out.supervision_loss)
    assert plain.supervision_loss == 0 and torch.equal(plain.token_loss, out.token_loss)
    with pytest.raises(ValueError, match="attention_targets"):
        model(pixel_values=images(2), labels=labels, attention_targets=targets[:, :3])


def test_supervision_with_a_sentinel_also_asks_the_named_word_to_look_at_the_picture():
    model = tiny_model(attention_supervision_weight=1.0, attention_penalty=0.0, visual_sentinel=True)
    labels = token_ids(batch=1, length=3)
    targets = torch.zeros(1, 3, 9)
    targets[0, 2, 5] = 1.0
    with torch.no_grad():
        out = model(pixel_values=images(1), labels=labels, attention_targets=targets, output_attentions=True)
    on_cell = out.cross_attentions[0, 2, 5] * (1 - out.sentinel_attentions[0, 2])
    torch.testing.assert_close(out.supervision_loss, -on_cell.log())


def test_supervision_moves_the_attention_toward_the_target():
    """A few gradient steps on the supervision loss alone put more of the named word's attention on its cells."""
    model = tiny_model(attention_supervision_weight=1.0, attention_penalty=0.0).train()
    labels = token_ids(batch=2, length=4)
    targets = torch.zeros(2, 4, 9)
    targets[:, 2, 7] = 1.0
    optimizer = torch.optim.SGD(model.decoder.parameters(), lr=0.5)
    before = model(pixel_values=images(2), labels=labels, output_attentions=True).cross_attentions[:, 2, 7]
    for _ in range(10):
        optimizer.zero_grad()
        model(pixel_values=images(2), labels=labels, attention_targets=targets).supervision_loss.backward()
        optimizer.step()
    after = model(pixel_values=images(2), labels=labels, output_attentions=True).cross_attentions[:, 2, 7]
    assert (after > before + 0.1).all()


def test_each_words_sentinel_share_reaches_the_figures(tmp_path):
    """caption_with_attention gives every word its sentinel share, and the figure writes it under the word."""
    model = variant("show_attend_tell", True, 0, "lstm", True)
    tokenizer = train_tokenizer(TINY_CAPTIONS * 5, vocab_size=40, model_type="word")
    image_processor = CaptionerImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CaptionerProcessor(image_processor, tokenizer)
    picture = Image.new("RGB", (32, 32), "red")
    _, words = caption_with_attention(model, processor, [picture], num_beams=2, max_new_tokens=5)
    shares = [w.sentinel for w in words[0]]
    assert shares and all(0 < share < 1 for share in shares)
    figure = plot_attention(picture, [w.word for w in words[0]], [w.attention for w in words[0]], sentinel=shares)
    titles = [axes.get_title(loc="center") for axes in panel_axes(figure)]
    assert all(f"{share:.0%} sentinel" in title for share, title in zip(shares, titles, strict=True))
