"""Torch-side data: (image, caption) training pairs, images for self-critical training, and batch collation."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .feature_store import FeatureStore
from .grounding import GroundedCaptions


class CaptionPairs(Dataset):
    """Every (image, caption) pair of a split: each caption is one training example, as in Show, Attend and Tell.

    With `features` (a `FeatureStore`), items carry the cached encoder output of their image instead of the image.
    """

    def __init__(self, dataset, features: FeatureStore | None = None):
        self.dataset = dataset
        self.features = features
        self.captions = dataset["captions"]  # read once: the image column is decoded per item, lazily
        counts = np.array([len(captions) for captions in self.captions], dtype=np.int64)
        self.captions_per_image = counts
        # the pair index as two integer arrays (8 bytes a pair, not a tuple's ~70: COCO has 616k pairs)
        self.pair_rows = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        first_pair_of_row = np.repeat(np.cumsum(counts) - counts, counts)  # caption i of a row: its i-th pair
        self.pair_captions = (np.arange(counts.sum()) - first_pair_of_row).astype(np.int32)

    def __len__(self) -> int:
        return len(self.pair_rows)

    def __getitem__(self, index: int) -> dict:
        row, caption_index = int(self.pair_rows[index]), int(self.pair_captions[index])
        return {
            "caption": self.captions[row][caption_index],
            "row": row,
            "caption_index": caption_index,
            **image_item(self.dataset, self.features, row),
        }


class EpochShuffleSampler(Sampler[int]):
    """A permutation fixed by (seed, epoch): resuming at a given epoch and step replays the same data order.

    With `group_sizes` (the indices come in consecutive groups of these sizes, e.g. the captions of each image), the
    groups are shuffled and each keeps its indices together, so a batch holds all captions of its images."""

    def __init__(self, length: int, seed: int, group_sizes: np.ndarray | None = None):
        if group_sizes is not None and int(np.sum(group_sizes)) != length:
            raise ValueError(f"group sizes add up to {int(np.sum(group_sizes))}, not to the {length} indices")
        self.length, self.seed, self.epoch, self.group_sizes = length, seed, 0, group_sizes

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.group_sizes is None:
            return iter(torch.randperm(self.length, generator=generator).tolist())
        sizes = np.asarray(self.group_sizes, dtype=np.int64)
        order = torch.randperm(len(sizes), generator=generator).numpy()
        starts, sizes = (np.cumsum(sizes) - sizes)[order], sizes[order]
        offsets = np.arange(self.length) - np.repeat(np.cumsum(sizes) - sizes, sizes)  # position inside its group
        return iter((np.repeat(starts, sizes) + offsets).tolist())

    def __len__(self) -> int:
        return self.length


class CaptionCollator:
    """A list of pair items -> model inputs: `pixel_values` (or cached `encoder_outputs` / `frozen_features`) and
    `labels`; with `grounding` (a `GroundedCaptions` of the split), also `attention_targets` (B, T, k)."""

    def __init__(self, processor, max_caption_tokens: int | None = None, grounding: GroundedCaptions | None = None):
        self.processor = processor
        self.max_caption_tokens = max_caption_tokens
        self.grounding = grounding

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        labels = self.processor.encode_captions([item["caption"] for item in items], max_length=self.max_caption_tokens)
        # longest caption first: the model's teacher forcing wants this order and need not reorder the regions
        order = sorted(range(len(items)), key=lambda i: -sum(token != -100 for token in labels[i]))
        items, labels = [items[i] for i in order], [labels[i] for i in order]
        batch = {"labels": torch.tensor(labels, dtype=torch.long), **image_inputs(items, self.processor)}
        if self.grounding is not None:
            length = batch["labels"].shape[1]
            maps = [self.grounding.maps(item["row"], item["caption_index"], length) for item in items]
            batch["attention_targets"] = torch.stack(maps)  # (B, T, k)
        return batch


class CaptionedImages(Dataset):
    """Every image of a split once, with its row number (self-critical training rewards a caption against the
    references of that row). With `features` (a `FeatureStore`), items carry the cached encoder output instead."""

    def __init__(self, dataset, features: FeatureStore | None = None):
        self.dataset = dataset
        self.features = features

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: int) -> dict:
        return {"row": row, **image_item(self.dataset, self.features, row)}


class ImageCollator:
    """A list of `CaptionedImages` items -> `rows` and `pixel_values` (or cached `encoder_outputs` /
    `frozen_features`)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        rows = torch.tensor([item["row"] for item in items], dtype=torch.long)
        return {"rows": rows, **image_inputs(items, self.processor)}


CACHED_INPUTS = ("encoder_outputs", "frozen_features")  # the model inputs a feature store may hold


def image_item(dataset, features: FeatureStore | None, row: int) -> dict:
    """One item's image side: its cached `features` when there are some (under the model input they are), else its
    (lazily decoded) `image`."""
    if features is not None:
        return {features.input_name: features[row]}
    return {"image": dataset[row]["image"]}


def image_inputs(items: list[dict], processor) -> dict[str, torch.Tensor]:
    """The model's image input for a batch of items: stacked cached features, or the processed `image`s. Items of
    the same image (`row`) share one: the batch then says which each caption reads (`image_index`), so the encoder
    runs once per image."""
    rows = [item.get("row") for item in items]
    if None not in rows and len(set(rows)) < len(rows):
        first = {}  # each image's first item, in the order first seen
        for item in items:
            first.setdefault(item["row"], {k: v for k, v in item.items() if k != "row"})
        position = {row: i for i, row in enumerate(first)}
        image_index = torch.tensor([position[row] for row in rows])
        return {**image_inputs(list(first.values()), processor), "image_index": image_index}
    for name in CACHED_INPUTS:
        if name in items[0]:
            # the store may hold bfloat16 or float16; the model computes in float32 (autocast lowers it where asked)
            return {name: torch.stack([item[name] for item in items]).float()}
    images = [item["image"] for item in items]
    return {"pixel_values": processor.image_processor(images, return_tensors="pt")["pixel_values"]}
