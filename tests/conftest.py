"""Shared fixtures: tiny configs and a tiny tokenizer, so the whole suite runs on a 2-core CPU, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from hf_captioner import CaptionerConfig, CaptionerForConditionalGeneration, train_tokenizer  # noqa: E402

TINY_VISION = {
    "model_type": "resnet",
    "layer_type": "basic",
    "embedding_size": 8,
    "depths": [1, 1],
    "hidden_sizes": [8, 16],
}
TINY_CAPTIONS = [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle next to a red circle",
    "two yellow stars below a blue square",
    "a small purple circle in the middle",
    "a large orange square on the right",
]


def tiny_config(**overrides) -> CaptionerConfig:
    """A decoder a few thousand parameters big, on a two-stage ResNet, with a 3 x 3 grid."""
    values = dict(
        vision_config=dict(TINY_VISION),
        grid_size=3,
        embed_dim=16,
        hidden_size=16,
        attention_dim=12,
        self_attention_heads=2,
        vocab_size=40,
        dropout=0.0,
    )
    values.update(overrides)
    return CaptionerConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> CaptionerForConditionalGeneration:
    torch.manual_seed(seed)
    return CaptionerForConditionalGeneration(tiny_config(**overrides)).eval()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY_CAPTIONS * 5, vocab_size=64)
