"""Torch-side data: (image, caption) training pairs, batch collation, and cached encoder features."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)


class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split: each caption is one training example, as in Show, Attend and Tell.

    With `features` (N, k, C), items carry the cached encoder output of their image instead of the image.
    """

    def __init__(self, dataset, features: torch.Tensor | None = None):
        self.dataset = dataset
        self.features = features
        self.captions = dataset["captions"]  # read once: the image column is decoded per item, lazily
        self.pairs = [(row, i) for row, captions in enumerate(self.captions) for i in range(len(captions))]

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        row, caption_index = self.pairs[index]
        return {"caption": self.captions[row][caption_index], **image_item(self.dataset, self.features, row)}


class EpochShuffleSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch): resuming at a given epoch and step replays the same data order."""

    def __init__(self, length: int, seed: int):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class CaptionCollator:
    """A list of pair items -> model inputs: `pixel_values` (or `encoder_outputs`) and `labels`."""

    def __init__(self, processor, max_caption_tokens: int | None = None):
        self.processor = processor
        self.max_caption_tokens = max_caption_tokens

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        labels = self.processor.encode_captions([item["caption"] for item in items], max_length=self.max_caption_tokens)
        # longest caption first: the model's teacher forcing wants this order and need not reorder the regions
        order = sorted(range(len(items)), key=lambda i: -sum(token != -100 for token in labels[i]))
        items, labels = [items[i] for i in order], [labels[i] for i in order]
        return {"labels": torch.tensor(labels, dtype=torch.long), **image_inputs(items, self.processor)}


class CaptionedImages(Dataset):
    """Every image of a split once, with its row number (self-critical training rewards a caption against the
    references of that row). With `features` (N, k, C), items carry the cached encoder output instead of the image."""

    def __init__(self, dataset, features: torch.Tensor | None = None):
        self.dataset = dataset
        self.features = features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict:
        return {"row": row, **image_item(self.dataset, self.features, row)}


class ImageCollator:
    """A list of `CaptionedImages` items -> `rows` and `pixel_values` (or `encoder_outputs`)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows = torch.tensor([item["row"] for item in items], dtype=torch.long)
        return {"rows": rows, **image_inputs(items, self.processor)}


def image_item(dataset, features: torch.Tensor | None, row: int) -> dict:
    """One item's image side: its cached `features` when there are some, else its (lazily decoded) `image`."""
    if features is not None:
        return {"features": features[row]}
    return {"image": dataset[row]["image"]}


def image_inputs(items: list[dict], processor) -> dict[str, torch.Tensor]:
    """The model's image input for a batch of items: stacked cached `features`, or the processed `image`s."""
    if "features" in items[0]:
        return {"encoder_outputs": torch.stack([item["features"] for item in items])}
    images = [item["image"] for item in items]
    return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]}


# image processor fields that say where the class lives, not how pixels are made (they change on save -> load)
BOOKKEEPING = ("auto_map", "processor_class", "image_processor_type")


def feature_cache_key(model, processor, dataset) -> str:
    """A key that changes whenever the cached features would: backbone weights and shape, image processing,
    grid size, and the split's content (its `datasets` fingerprint)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    description = {
        "vision_config": model.config.vision_config.to_dict(),
        "grid_size": model.config.grid_size,
        "image_processor": {k: v for k, v in processor.image_processor.to_dict().items() if k not in BOOKKEEPING},
        "data": dataset._fingerprint,
    }
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


@torch.no_grad()
def encode_split(model, processor, dataset, cache_dir: str | os.PathLike, batch_size: int = 64) -> torch.Tensor:
    """Region features (N, k, C) of every image of a split, computed once and kept on disk for later runs."""
    path = Path(cache_dir).expanduser() / f"{feature_cache_key(model, processor, dataset)}.safetensors"
    if path.is_file():
        logger.info("Reusing cached encoder features %s", path)
        return load_file(path)["features"]
    encoder = model.encoder.eval()
    device = next(encoder.parameters()).device
    images = dataset.select_columns(["image"])  # decoded lazily, batch by batch

    def collate(rows: list[dict]) -> torch.Tensor:
        return processor.image_processor([row["image"] for row in rows], return_tensors="pt")["pixel_values"]

    chunks = []
    # its own generator: iterating must not draw from the global RNG, or a cold cache would change the training run
    loader = DataLoader(images, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
    for pixel_values in tqdm(loader, desc="Encoding images"):
        chunks.append(encoder(pixel_values.to(device)).last_hidden_state.cpu())
    features = torch.cat(chunks).contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    save_file({"features": features}, partial)
    os.replace(partial, path)  # a run killed while writing never leaves a truncated cache behind
    logger.info("Cached encoder features %s of %d images at %s", tuple(features.shape), len(features), path)
    return features
