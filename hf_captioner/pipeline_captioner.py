"""The captioner's pipeline class, which its saved folders name in `config.custom_pipelines`.

transformers' image-text-to-text pipeline wants a text beside every picture (given alone, a path is taken for a
prompt and a PIL picture is refused); a captioner's text is only an optional prompt. With this class,
`pipeline("image-text-to-text" or "image-to-text", model=..., trust_remote_code=True)(picture)` captions the picture
with no prompt, and `text=` still starts the caption.

`save_pretrained` copies this file next to the weights (modeling_captioner.py imports it relatively), so it imports
nothing from hf_captioner.
"""

from __future__ import annotations

from transformers.pipelines.image_text_to_text import ImageTextToTextPipeline

# config.custom_pipelines of a saved folder: both task names a user may type reach this class
CUSTOM_PIPELINES = {
    task: {"impl": "pipeline_captioner.CaptionerPipeline", "pt": ["AutoModelForImageTextToText"], "type": "multimodal"}
    for task in ("image-text-to-text", "image-to-text")
}


def _is_picture(value) -> bool:
    """A path or URL, or an image object (PIL, numpy, torch): what `load_image` reads."""
    return isinstance(value, str) or hasattr(value, "shape") or type(value).__module__.startswith("PIL.")


class CaptionerPipeline(ImageTextToTextPipeline):
    """The image-text-to-text pipeline, where a picture (or a list of them) given without `text` gets no prompt."""

    def __call__(self, images=None, text=None, **kwargs):
        if text is None and images is not None:
            if _is_picture(images):
                text = ""
            elif isinstance(images, (list, tuple)) and images and all(map(_is_picture, images)):
                text = [""] * len(images)
        return super().__call__(images, text=text, **kwargs)
