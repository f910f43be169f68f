"""hf-captioner: an attention-based image captioner on transformers.

Importing the package registers its classes with the Auto factories, so inside this environment
`AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` work without `trust_remote_code`.
"""

import sys
from pathlib import Path

# scripts/evaluate.py shares its name with the `evaluate` library, and running any of our scripts puts scripts/ first
# on the import path, where that file would shadow the library: take that folder off the path.
_SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _SCRIPTS]

from transformers import (  # noqa: E402
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_captioner import CaptionerConfig  # noqa: E402
from .modeling_captioner import (  # noqa: E402
    CaptionerCache,
    CaptionerForConditionalGeneration,
    CaptionerOutput,
    CaptionerPreTrainedModel,
)
from .processing_captioner import CaptionerImageProcessor, CaptionerProcessor  # noqa: E402
from .tokenization import train_tokenizer  # noqa: E402

__version__ = "0.1.0"

AutoConfig.register(CaptionerConfig.model_type, CaptionerConfig, exist_ok=True)
AutoModel.register(CaptionerConfig, CaptionerForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(CaptionerConfig, CaptionerForConditionalGeneration, exist_ok=True)
AutoImageProcessor.register(
    CaptionerConfig, image_processor_classes={"torchvision": CaptionerImageProcessor}, exist_ok=True
)
AutoProcessor.register(CaptionerConfig, CaptionerProcessor, exist_ok=True)

# `save_pretrained` then copies the code files and writes `auto_map`, for `trust_remote_code` loading elsewhere.
CaptionerConfig.register_for_auto_class()
CaptionerForConditionalGeneration.register_for_auto_class("AutoModel")  # + AutoModelForImageTextToText
CaptionerImageProcessor.register_for_auto_class("AutoImageProcessor")
CaptionerProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "CaptionerCache",
    "CaptionerConfig",
    "CaptionerForConditionalGeneration",
    "CaptionerImageProcessor",
    "CaptionerOutput",
    "CaptionerPreTrainedModel",
    "CaptionerProcessor",
    "train_tokenizer",
]
