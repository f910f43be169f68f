"""Processor of the captioner: an image processor (any picture -> normalised RGB tensor) + the caption tokenizer.

This file is copied next to the weights by `save_pretrained` (for `trust_remote_code` loading), so it imports
nothing from `hf_captioner`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling
from transformers.processing_utils import ProcessorMixin

ImageLike = Image.Image | np.ndarray | str | os.PathLike


# what PIL raises for a file that is not a picture, a truncated one, or a decompression bomb
UNREADABLE_IMAGE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def open_image(path: str | os.PathLike | BinaryIO, name: str | None = None) -> Image.Image:
    """Open an image file (or downloaded bytes, named by `name`) fully, upright by its EXIF orientation, turning "not
    an image" into a ValueError that names it."""
    name = name or str(path)
    try:
        with Image.open(path) as image:
            image.load()
            return ImageOps.exif_transpose(image)
    except FileNotFoundError:
        raise FileNotFoundError(f"Image file not found: {name}") from None
    except UNREADABLE_IMAGE_ERRORS as err:
        raise ValueError(f"{name} is not a readable image ({type(err).__name__}: {err})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: transparency composited onto white, palette expanded, CMYK/grey/16-bit converted."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):  # 16-bit files (PNG, TIFF): full scale is 65535, as 255 is in 8 bit
            full_scale = 65535.0
        else:  # 32-bit integer or float pixels have no fixed range: the picture's own peak is white
            full_scale = array.max() if array.size and array.max() > 0 else 1.0
        image = Image.fromarray((array / full_scale * 255.0).round().clip(0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


class CaptionerImageProcessor(TorchvisionBackend):
    r"""Resize the shorter side, centre-crop, rescale and normalise (ImageNet statistics, as the backbones expect).

    Accepts PIL images, arrays (H, W, C) or (C, H, W), and paths to image files, singly or in a list; every picture
    is converted to RGB first, whatever its mode.
    """

    model_input_names = ["pixel_values"]
    resample = PILImageResampling.BICUBIC
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 256}
    crop_size = {"height": 224, "width": 224}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    do_normalize = True
    do_convert_rgb = False  # done by `_load`, which also handles CMYK, 16-bit and transparency

    def _load(self, image: ImageLike, index: int) -> Image.Image | np.ndarray:
        if isinstance(image, (str, os.PathLike)):
            return to_rgb(open_image(image))
        if isinstance(image, Image.Image):
            return to_rgb(image)
        if isinstance(image, np.ndarray) or type(image).__module__.startswith("torch"):
            array = np.asarray(image)
            if array.ndim == 2:
                array = np.repeat(array[..., None], 3, axis=-1)
            if array.ndim != 3 or (3 not in array.shape[::2] and 1 not in array.shape[::2]):
                raise ValueError(f"Image {index}: expected an (H, W, 3) or (3, H, W) array, got shape {array.shape}")
            return array
        raise ValueError(f"Image {index}: expected a PIL image, an array or a file path, got {type(image).__name__}")

    def preprocess(self, images: ImageLike | Sequence[ImageLike], **kwargs) -> BatchFeature:
        if isinstance(images, (Image.Image, str, os.PathLike)) or getattr(images, "ndim", 4) < 4:
            images = [images]  # one picture; a list, a data set column or a 4-d batch are iterated
        images = list(images)
        if len(images) == 0:
            raise ValueError("No images given")
        return super().preprocess([self._load(image, i) for i, image in enumerate(images)], **kwargs)


class CaptionerProcessor(ProcessorMixin):
    r"""The captioner's image processor and caption tokenizer in one object.

    As BLIP's and GIT's: `images=` gives `pixel_values`; `text=` is a prompt, the forced start of the caption
    (`decoder_input_ids`: `<s>` + its tokens; `""` is no prompt), for `generate()` and the image-text-to-text
    pipeline; `text_target=` gives training `labels` (caption ids + `</s>`, padding as -100).
    `processor.batch_decode(ids, skip_special_tokens=True)` gives clean lower-case captions.
    """

    # loading options that transformers keeps among the tokenizer's init kwargs and would write into
    # tokenizer_config.json: they describe one machine's load, not the tokenizer
    LOAD_ONLY_KEYS = ("local_files_only", "is_local")

    def __init__(self, image_processor, tokenizer, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """As `ProcessorMixin.save_pretrained`, without this machine's loading options in tokenizer_config.json."""
        for key in self.LOAD_ONLY_KEYS:
            self.tokenizer.init_kwargs.pop(key, None)
        return super().save_pretrained(save_directory, *args, **kwargs)

    def __call__(
        self,
        images: ImageLike | Sequence[ImageLike] | None = None,
        text: str | Sequence[str] | None = None,
        text_target: str | Sequence[str] | None = None,
        return_tensors: str | None = None,
        max_length: int | None = None,
        padding: bool | str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """`padding` is accepted because the pipeline asks for it with several prompts; they are never padded."""
        if images is None and text is None and text_target is None:
            raise ValueError("CaptionerProcessor needs `images`, `text` (a prompt), `text_target` (captions) or both")
        data = {}
        if images is not None:
            data.update(self.image_processor(images, return_tensors=return_tensors, **kwargs))
        if text is not None:
            data["decoder_input_ids"] = self.encode_prompts(text)
        if text_target is not None:
            data["labels"] = self.encode_captions(text_target, max_length=max_length)
        return BatchFeature(data, tensor_type=return_tensors)

    def encode_prompts(self, text: str | Sequence[str]) -> list[list[int]]:
        """Prompts -> `<s>` + their tokens, the start every caption of the batch is forced to begin with. Rows
        cannot be padded (decoding has no mask), so a batch's prompts must have the same number of tokens."""
        prompts = [text] if isinstance(text, str) else list(text)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise ValueError(f"Prompt {i} is not a string: {prompt!r}")
        start, unknown = self.tokenizer.bos_token_id, self.tokenizer.unk_token_id
        encoded = [[start, *ids] for ids in self.tokenizer(prompts, add_special_tokens=False)["input_ids"]]
        for prompt, ids in zip(prompts, encoded, strict=True):
            if unknown in ids:  # the caption could not start with it: <unk> decodes to nothing
                words = prompt.split()
                pieces = self.tokenizer(words, add_special_tokens=False)["input_ids"] if words else []
                unknown_words = [word for word, word_ids in zip(words, pieces, strict=True) if unknown in word_ids]
                raise ValueError(
                    f"Prompt {prompt!r} has words outside the captioner's vocabulary: "
                    f"{', '.join(map(repr, unknown_words or [prompt]))} (a prompt is the start of the caption; to "
                    'caption a picture with no prompt, pass text="")'
                )
        if len({len(ids) for ids in encoded}) > 1:
            raise ValueError(
                f"Prompts of one batch must have the same number of tokens, got {[len(ids) - 1 for ids in encoded]} "
                f"for {prompts}: caption them one at a time (pipeline batch_size=1)"
            )
        return encoded

    def encode_captions(self, text: str | Sequence[str], max_length: int | None = None) -> list[list[int]]:
        """Captions -> target ids ending in `</s>`, right-padded with -100 (ignored by the loss)."""
        captions = [text] if isinstance(text, str) else list(text)
        for i, caption in enumerate(captions):
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"Caption {i} is empty or not a string: {caption!r}")
        encoded = self.tokenizer(captions, truncation=max_length is not None, max_length=max_length)["input_ids"]
        longest = max(len(ids) for ids in encoded)
        return [ids + [-100] * (longest - len(ids)) for ids in encoded]

    def batch_decode(self, sequences, skip_special_tokens: bool = True, **kwargs) -> list[str]:
        texts = self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens, **kwargs)
        return [" ".join(text.split()) for text in texts]

    def decode(self, token_ids, skip_special_tokens: bool = True, **kwargs) -> str:
        return " ".join(self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, **kwargs).split())

    def words_of(self, token_ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """The words of a generated caption (its ids after `<s>`) with the positions of their pieces, up to `</s>`:
        what a word's attention is averaged over (SentencePiece marks a word's first piece with "▁")."""
        tokenizer = self.tokenizer
        special = {tokenizer.pad_token_id, tokenizer.bos_token_id}
        words: list[tuple[str, list[int]]] = []
        for step, token_id in enumerate(int(i) for i in token_ids):
            if token_id == tokenizer.eos_token_id:
                break
            if token_id in special:
                continue
            piece = tokenizer.convert_ids_to_tokens(token_id)
            if piece.startswith("▁") or not words:
                words.append((piece.lstrip("▁"), [step]))
            else:
                words[-1] = (words[-1][0] + piece, words[-1][1] + [step])
        return [(word, steps) for word, steps in words if word]

    def post_process_image_text_to_text(self, generated_outputs, skip_special_tokens: bool = True, **kwargs):
        """The image-text-to-text pipeline's decoding: the same clean captions as `batch_decode`."""
        return self.batch_decode(generated_outputs, skip_special_tokens=skip_special_tokens, **kwargs)

    @property
    def model_input_names(self) -> list[str]:
        return ["pixel_values", "decoder_input_ids", "labels"]


CaptionerImageProcessor.register_for_auto_class("AutoImageProcessor")  # saved: auto_map (see the config's file)
CaptionerProcessor.register_for_auto_class("AutoProcessor")
if __name__.startswith("hf_captioner."):
    from transformers import AutoImageProcessor, AutoProcessor

    from .configuration_captioner import CaptionerConfig

    AutoImageProcessor.register(
        CaptionerConfig, image_processor_classes={"torchvision": CaptionerImageProcessor}, exist_ok=True
    )
    AutoProcessor.register(CaptionerConfig, CaptionerProcessor, exist_ok=True)

__all__ = ["CaptionerImageProcessor", "CaptionerProcessor", "open_image", "to_rgb"]
