"""hf-captioner: an attention-based image captioner on transformers.

The classes are imported on first use, so `import hf_captioner` and every command's `--help` stay free of torch.
Using any of them (`from hf_captioner import CaptionerForConditionalGeneration`) registers them all with the Auto
factories, after which `AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` work without
`trust_remote_code` in this environment.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CaptionerCache": "modeling_captioner",
    "CaptionerConfig": "configuration_captioner",
    "CaptionerForConditionalGeneration": "modeling_captioner",
    "CaptionerImageProcessor": "processing_captioner",
    "CaptionerOutput": "modeling_captioner",
    "CaptionerPreTrainedModel": "modeling_captioner",
    "CaptionerProcessor": "processing_captioner",
    "WordAttention": "inference",
    "caption_with_attention": "inference",
    "plot_attention": "visualize",
    "train_tokenizer": "tokenization",
}
_CLASS_MODULES = ("configuration_captioner", "modeling_captioner", "processing_captioner")  # each registers its own


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for module in _CLASS_MODULES:
        importlib.import_module(f".{module}", __name__)
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = sorted(_EXPORTS)
