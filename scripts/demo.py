"""The demo on the embedded sample data: draw it, build a captioner, caption held-out pictures.

(Until training lands, the model is untrained: its captions are noise, but every step runs for real.)
"""

import logging

import torch

from hf_captioner import (
    CaptionerConfig,
    CaptionerForConditionalGeneration,
    CaptionerImageProcessor,
    CaptionerProcessor,
    train_tokenizer,
)
from hf_captioner.data import make_sample_dataset


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    data = make_sample_dataset(n_train=200, n_val=20, n_test=8, seed=0)
    tokenizer = train_tokenizer(
        [c for row in data["train"]["captions"] for c in row], vocab_size=200, model_type="word"
    )
    processor = CaptionerProcessor(
        CaptionerImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64}), tokenizer
    )
    vision = {
        "model_type": "resnet",
        "layer_type": "basic",
        "embedding_size": 16,
        "depths": [1, 1],
        "hidden_sizes": [16, 32],
    }
    torch.manual_seed(0)
    config = CaptionerConfig(
        vision_config=vision, grid_size=4, embed_dim=64, hidden_size=64, attention_dim=64, vocab_size=len(tokenizer)
    )
    model = CaptionerForConditionalGeneration(config).eval()
    test = data["test"]
    ids = model.generate(**processor(images=test["image"], return_tensors="pt"), num_beams=3, max_new_tokens=12)
    for caption, references in zip(processor.batch_decode(ids), test["captions"], strict=True):
        print(f"{caption!r:60}  reference: {references[0]!r}")


if __name__ == "__main__":
    main()
