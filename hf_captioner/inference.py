"""Captioning with a trained model: pictures or a whole data split, optionally with each word's attention map, the
validation loss, and the inference speed options. Training, evaluation, the commands and the demo build on this
module; it imports nothing of theirs.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from . import modeling_captioner, processing_captioner  # noqa: F401  (register the Auto classes, as the package's do)
from .data.feature_store import FeatureStore
from .data.pairs import image_inputs, image_item

logger = logging.getLogger(__name__)


def cpu_multiplies_bf16_fast() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX). Without them torch's bf16 products run
    a fallback hundreds of times slower than float32 (docs/performance.md has the figures of each machine)."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


PRECISIONS = ("auto", "float32", "bf16")


@functools.cache
def bf16_pays(device_type: str = "cpu") -> bool:
    """Whether bf16 products beat float32 ones here: on a GPU, whether it supports bf16; on a CPU, a probe at a
    batched decoder step's shape (96 x 2560 x 2048), only where the CPU has bfloat16 matrix instructions (the
    fallback elsewhere is hundreds of times slower), bf16 at least 1.2x as fast. About 0.1 s, once per process."""
    if device_type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device_type != "cpu" or not cpu_multiplies_bf16_fast():
        return False
    generator = torch.Generator().manual_seed(0)
    rows, weights = torch.randn(96, 2560, generator=generator), torch.randn(2560, 2048, generator=generator)
    seconds = {}
    for dtype in (torch.float32, torch.bfloat16):
        x, w = rows.to(dtype), weights.to(dtype)
        x @ w  # warm-up
        started = time.perf_counter()
        for _ in range(5):
            x @ w
        seconds[dtype] = time.perf_counter() - started
    return 1.2 * seconds[torch.bfloat16] < seconds[torch.float32]


def use_bf16(precision: str, device: torch.device) -> bool:
    """`precision` ("auto", "float32" or "bf16") as a decision: "auto" is bf16 exactly where `bf16_pays`."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision == "bf16" or (precision == "auto" and bf16_pays(device.type))


def warn_if_bf16_is_slow(device: torch.device) -> None:
    """bf16 was asked for: warn where it will run hundreds of times slower than float32 (a CPU without
    bfloat16 matrix instructions). Captioning (`speed_options`) and training both call it."""
    if device.type == "cpu" and not cpu_multiplies_bf16_fast():
        logger.warning(
            "bf16 was asked for, but this CPU has no bfloat16 matrix instructions (AVX512-BF16 or AMX): torch's bf16 "
            "products will run hundreds of times slower than float32 here; leave bf16 off on this machine"
        )


def speed_options(model, bf16: bool = False, channels_last: bool = False, compile_step: bool = False):
    """Apply the inference speed options that `hf-captioner benchmark` measures, and return the context to caption in.

    channels_last: the encoder's convolutions in NHWC layout; bf16: autocast matrix products to bfloat16 (captions
    change slightly: see the README; on a CPU, only worth it with AVX512-BF16 or AMX); compile_step: `torch.compile`
    the decoder step (dynamic shapes; slow first call).
    """
    if bf16:
        warn_if_bf16_is_slow(model.device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile_step:
        model.decoder.compile_steps()
    return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bf16)


@dataclass
class WordAttention:
    """One generated word and the attention over the S x S grid while it was emitted (mean over its pieces)."""

    word: str
    attention: np.ndarray  # (S, S)
    sentinel: float | None = None  # the share of attention given to the visual sentinel, where the model has one


@torch.no_grad()
def word_attention(model, processor, inputs: dict, sequences: torch.Tensor) -> list[list[WordAttention]]:
    """Per image, its generated words with their attention maps. `inputs`: the model inputs (`pixel_values`,
    `encoder_outputs` or `frozen_features`) the captions were generated from.

    The captions are fed back through the model (teacher forcing reproduces decoding exactly), so this works for
    any decoding method: position t of `cross_attentions` is where the model looked while emitting token t + 1.
    """
    config = model.config
    targets = sequences[:, 1:]
    outputs = model(**inputs, decoder_input_ids=sequences[:, :-1].to(model.device), output_attentions=True)
    maps = outputs.cross_attentions.float().cpu().view(*targets.shape, config.grid_size, config.grid_size)
    shares = outputs.sentinel_attentions  # (B, T) or None

    def sentinel(row: int, steps: list[int]) -> float | None:
        return None if shares is None else float(shares[row, steps].float().mean())

    return [
        [
            WordAttention(word, maps[row, steps].mean(0).numpy(), sentinel(row, steps))
            for word, steps in processor.words_of(ids)
        ]
        for row, ids in enumerate(targets.tolist())
    ]


@torch.no_grad()
def caption_batch(
    model, processor, inputs: dict, attention: bool = False, **generate_kwargs
) -> tuple[list[str], list[list[WordAttention]] | None]:
    """Captions of one batch of model inputs and, when `attention`, each caption's words with their attention maps
    (None otherwise: the maps cost a second pass through the model)."""
    if "frozen_features" in inputs:  # generate takes images or regions: the encoder's top runs once, here
        inputs = {"encoder_outputs": model.encoder(frozen_features=inputs["frozen_features"])}
    sequences = model.generate(**inputs, **generate_kwargs)
    maps = word_attention(model, processor, inputs, sequences) if attention else None
    return processor.batch_decode(sequences), maps


def caption_with_attention(
    model, processor, images, attention: bool = True, **generate_kwargs
) -> tuple[list[str], list[list[WordAttention]] | None]:
    """Captions of a list of PIL pictures and, with `attention`, each caption's words with their (S, S) attention
    maps (`WordAttention`), in one call; `generate_kwargs` go to `model.generate` (num_beams, max_new_tokens...).

    ```python
    from hf_captioner import caption_with_attention, plot_attention
    captions, words = caption_with_attention(model, processor, [picture], num_beams=3)
    plot_attention(picture, [w.word for w in words[0]], [w.attention for w in words[0]], "attention.png")
    ```
    """
    pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(model.device)
    return caption_batch(model, processor, {"pixel_values": pixel_values}, attention, **generate_kwargs)


@torch.no_grad()
def generate_captions(
    model,
    processor,
    dataset,
    accelerator=None,
    features: FeatureStore | None = None,
    batch_size: int = 64,
    progress: bool = True,
    on_attention: Callable[[int, list[WordAttention]], None] | None = None,
    **generate_kwargs,
) -> list[str]:
    """One caption per image of `dataset`, in its order, from its pictures or its cached `features`. With an
    accelerator the images are shared out among processes and the captions gathered, so every process gets the whole
    list. `on_attention(row, words)`, if given, gets each caption's words with their attention maps from the same pass,
    batch by batch (in each process for its own rows): the maps of a whole split are never held at once."""
    model = accelerator.unwrap_model(model) if accelerator is not None else model
    was_training = model.training
    model.eval()
    indices = list(range(len(dataset)))
    if accelerator is not None and accelerator.num_processes > 1:
        with accelerator.split_between_processes(indices) as shard:
            indices = list(shard)
    device = model.device
    results = []
    show = progress and (accelerator is None or accelerator.is_local_main_process)
    for start in tqdm(range(0, len(indices), batch_size), desc="Captioning", disable=not show, leave=False):
        chunk = indices[start : start + batch_size]
        items = [image_item(dataset, features, row) for row in chunk]
        inputs = {name: tensor.to(device) for name, tensor in image_inputs(items, processor).items()}
        captions, maps = caption_batch(model, processor, inputs, on_attention is not None, **generate_kwargs)
        results.extend(zip(chunk, captions, strict=True))
        if on_attention is not None:
            for row, words in zip(chunk, maps, strict=True):
                on_attention(row, words)
    if accelerator is not None and accelerator.num_processes > 1:
        results = gather_object(results)
    model.train(was_training)
    by_index = dict(results)
    return [by_index[index] for index in range(len(dataset))]


def caption_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-caption summed cross-entropy and token count (B,), B,), for exact corpus means across processes."""
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")  # (B, T)
    return losses.sum(dim=1), (labels != -100).sum(dim=1)


@torch.no_grad()
def validation_loss(model, loader, accelerator) -> float:
    """Mean token cross-entropy (no label smoothing, no attention penalty) over a loader of caption batches."""
    model.eval()
    total, tokens = 0.0, 0
    for batch in loader:
        outputs = model(**batch)
        loss_sums, counts = accelerator.gather_for_metrics(caption_token_losses(outputs.logits, batch["labels"]))
        total += loss_sums.sum().item()
        tokens += counts.sum().item()
    return total / max(tokens, 1)
