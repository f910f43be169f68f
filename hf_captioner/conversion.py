"""Weight conversion between two implementations of the same network whose state dicts list the same tensors in
the same order under other names (e.g. the EfficientNet-Lite0 wheel and timm's `tf_efficientnet_lite0`)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping

import torch


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
