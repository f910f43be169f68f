"""hf-captioner: an attention-based image captioner on transformers.

Importing the package registers its classes with the Auto factories, so inside this environment
`AutoModel.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` work without `trust_remote_code`.
"""

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from .configuration_captioner import CaptionerConfig
from .modeling_captioner import (
    CaptionerCache,
    CaptionerForConditionalGeneration,
    CaptionerOutput,
    CaptionerPreTrainedModel,
)
from .processing_captioner import CaptionerImageProcessor, CaptionerProcessor
from .tokenization import train_tokenizer

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
