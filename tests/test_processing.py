"""The tokenizer trained on captions and the processor: ids, decoding, image modes, bad inputs."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch
from conftest import TINY_CAPTIONS, write_bomb_png, write_truncated_jpeg
from PIL import Image

from hf_captioner import CaptionerImageProcessor, CaptionerProcessor, train_tokenizer
from hf_captioner.tokenization import fast_tokenizer_from_sentencepiece, normalize_caption, train_sentencepiece

RED = (1.0 - 0.485) / 0.229  # normalised red channel of a pure red pixel (ImageNet statistics)
WHITE = [(1.0 - m) / s for m, s in zip((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), strict=True)]


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
    image_processor = CaptionerImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    return CaptionerProcessor(image_processor, tiny_tokenizer)


def test_tokenizer_special_ids_and_end_of_sentence(tiny_tokenizer):
    assert tiny_tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<unk>"]
    ids = tiny_tokenizer("a red circle")["input_ids"]
    assert ids[-1] == tiny_tokenizer.eos_token_id and tiny_tokenizer.eos_token_id == 2
    assert tiny_tokenizer.pad_token_id == 0 and tiny_tokenizer.bos_token_id == 1 and tiny_tokenizer.unk_token_id == 3


def test_tokenizer_normalises_raw_text_like_the_training_captions(tiny_tokenizer):
    assert tiny_tokenizer("  A  RED\tCircle ")["input_ids"] == tiny_tokenizer("a red circle")["input_ids"]


@pytest.mark.parametrize("model_type", ["unigram", "word"])
def test_fast_tokenizer_segments_exactly_like_sentencepiece(tmp_path, model_type):
    captions = TINY_CAPTIONS * 5 + ["the dog's ball, near a café — 3 kids jump!"]
    sp = train_sentencepiece(captions, 80, tmp_path / "spm", model_type)
    fast = fast_tokenizer_from_sentencepiece(sp, model_type)
    probes = captions + ["a purple star on the red square"]
    if model_type == "unigram":  # sentencepiece's word model merges a run of unknown words into one <unk>
        probes.append("unseen wörds appear here")
    for text in probes:
        assert fast(text)["input_ids"] == sp.encode(normalize_caption(text)) + [sp.eos_id()], text
    assert isinstance(sp, spm.SentencePieceProcessor)


def test_word_tokenizer_keeps_whole_words_and_maps_unknown_ones_to_unk():
    tokenizer = train_tokenizer(TINY_CAPTIONS * 3, vocab_size=100, model_type="word")
    assert tokenizer.tokenize("a purple circle") == ["▁a", "▁purple", "▁circle"]
    assert tokenizer("a zebra")["input_ids"][1] == tokenizer.unk_token_id


def test_train_tokenizer_rejects_bad_input():
    with pytest.raises(ValueError, match="non-empty caption"):
        train_tokenizer(["", "   "], vocab_size=50)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(TINY_CAPTIONS, model_type="bpe")
    characters = len(set("".join(TINY_CAPTIONS)))  # the space included
    with pytest.raises(ValueError, match=f"vocab_size {characters + 3} is too small .* at least {characters + 4}"):
        train_tokenizer(TINY_CAPTIONS, vocab_size=characters + 3)
    assert len(train_tokenizer(TINY_CAPTIONS, vocab_size=characters + 4)) >= characters + 4


def test_a_very_long_caption_still_trains_the_tokenizer():
    """SentencePiece leaves out lines over 4,192 bytes unless told otherwise: their words would become <unk>."""
    long_caption = " ".join(["zebra"] * 1000)  # about 6,000 bytes; the only caption with this word
    tokenizer = train_tokenizer([*TINY_CAPTIONS, long_caption], vocab_size=64, model_type="word")
    assert tokenizer.unk_token_id not in tokenizer("a zebra")["input_ids"]


def test_processor_gives_pixel_values_and_padded_labels(processor):
    image = Image.new("RGB", (60, 40), (255, 0, 0))
    batch = processor(
        images=[image, image], text_target=["a red circle", "a blue square at the top"], return_tensors="pt"
    )
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    torch.testing.assert_close(batch["pixel_values"][0, 0], torch.full((32, 32), RED), atol=1e-4, rtol=0)
    labels = batch["labels"]
    first = processor.tokenizer("a red circle")["input_ids"]
    assert labels[0, : len(first)].tolist() == first
    assert (labels[0, len(first) :] == -100).all() and (labels[1] != -100).all()


def test_text_is_a_prompt_the_caption_must_start_with(processor):
    """As in BLIP and GIT: `text=` is the caption's forced start after <s>; "" is no prompt at all."""
    bos = processor.tokenizer.bos_token_id
    assert processor(text="")["decoder_input_ids"] == [[bos]]
    pieces = processor.tokenizer("A Red", add_special_tokens=False)["input_ids"]
    assert processor(text=["a red", "A  RED"])["decoder_input_ids"] == [[bos, *pieces]] * 2  # normalised as captions
    assert processor.tokenizer.eos_token_id not in processor(text="a red")["decoder_input_ids"][0]
    with pytest.raises(ValueError, match="same number of tokens"):
        processor(text=["a", "a red circle"])
    with pytest.raises(ValueError, match="'a zebra' has words outside"):
        processor(text="a zebra")


def test_batch_decode_gives_clean_lower_case_captions(processor):
    ids = processor.tokenizer(["A Red  Circle", "two yellow stars"])["input_ids"]
    with_start = [[1] + row + [0, 0] for row in ids]
    assert processor.batch_decode(with_start) == ["a red circle", "two yellow stars"]


@pytest.mark.parametrize(
    "image,expected_first_pixel",
    [
        (Image.new("L", (50, 50), 255), WHITE),
        (Image.new("RGBA", (50, 50), (255, 0, 0, 255)), [RED, None, None]),
        (Image.new("RGBA", (50, 50), (0, 0, 0, 0)), WHITE),  # fully transparent: white background
        (Image.new("LA", (50, 50), (0, 0)), WHITE),
        (Image.new("CMYK", (50, 50), (0, 0, 0, 0)), WHITE),
        (Image.new("I;16", (50, 50), 65535), WHITE),
        (Image.new("1", (50, 50), 1), WHITE),
        (np.full((50, 50, 3), 255, dtype=np.uint8), WHITE),
    ],
)
def test_every_image_mode_becomes_normalised_rgb(processor, image, expected_first_pixel):
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 32, 32)
    for channel, value in enumerate(expected_first_pixel):
        if value is not None:
            assert pixels[0, channel, 16, 16].item() == pytest.approx(value, abs=1e-3)


def test_a_16_bit_picture_looks_like_its_8_bit_copy(processor, tmp_path):
    """Full scale is 65535 in 16 bit: a dark 16-bit picture stays dark (it was stretched to its own maximum)."""
    grey = np.random.default_rng(0).integers(0, 60, (40, 40), dtype=np.uint16)  # a dark picture
    Image.fromarray(grey.astype(np.uint8), mode="L").save(tmp_path / "8bit.png")
    Image.fromarray(grey * 257).save(tmp_path / "16bit.png")  # the same values at 16 bits
    assert Image.open(tmp_path / "16bit.png").mode == "I;16"
    eight, sixteen = (
        processor(images=str(tmp_path / name), return_tensors="pt")["pixel_values"]
        for name in ("8bit.png", "16bit.png")
    )
    torch.testing.assert_close(sixteen, eight)


def test_palette_images_are_expanded(processor):
    image = Image.new("P", (50, 50), 0)
    image.putpalette([255, 0, 0] + [0, 0, 0] * 255)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels[0, 0, 5, 5].item() == pytest.approx(RED, abs=1e-3)


def test_image_files_are_loaded_and_a_non_image_is_named(processor, tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (50, 50), (255, 0, 0)).save(good)
    assert processor(images=[str(good)], return_tensors="pt")["pixel_values"].shape == (1, 3, 32, 32)
    bad = tmp_path / "notes.jpg"
    bad.write_text("this is not a picture")
    with pytest.raises(ValueError, match="notes.jpg"):
        processor(images=[str(good), str(bad)])
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(good.read_bytes()[:60])
    with pytest.raises(ValueError, match="cut.png"):
        processor(images=str(truncated))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        processor(images=str(tmp_path / "missing.png"))
    for broken in (write_truncated_jpeg(tmp_path / "half.jpg"), write_bomb_png(tmp_path / "bomb.png")):
        with pytest.raises(ValueError, match=broken.name):
            processor(images=str(broken))


def test_bad_inputs_get_clear_errors(processor):
    with pytest.raises(ValueError, match="Caption 1"):
        processor(text_target=["a red circle", "   "])
    with pytest.raises(ValueError, match="images"):
        processor()
    with pytest.raises(ValueError, match="Image 0"):
        processor(images=[np.zeros((4, 4, 4, 4))])
    with pytest.raises(ValueError, match="Image 0"):
        processor(images=[{"not": "an image"}])


def test_a_reloaded_processor_saves_no_loading_options(processor, tmp_path):
    """transformers keeps `local_files_only` / `is_local` among a loaded tokenizer's init kwargs; they must not reach
    a saved (and then published) tokenizer_config.json."""
    processor.save_pretrained(tmp_path / "first")
    reloaded = CaptionerProcessor.from_pretrained(tmp_path / "first", local_files_only=True)
    reloaded.save_pretrained(tmp_path / "second")
    saved = json.loads((tmp_path / "second" / "tokenizer_config.json").read_text())
    assert not {"local_files_only", "is_local"} & set(saved)
    assert saved["eos_token"] == "</s>"
