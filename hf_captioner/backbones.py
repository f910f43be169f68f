"""Vision backbones, in one place: what a backbone name means, how the network is built, where its stages are, how
its last feature map is read, and the image settings it was trained with.

- transformers: any `AutoBackbone`, described by `CaptionerConfig.vision_config` (no name);
- timm: "timm:NAME" (the architecture), or, for starting from pretrained weights, "timm/NAME" (a timm Hub model);
- torchvision: "torchvision:NAME".

`save_pretrained` copies this file next to the weights with the model (it is a relative import of
modeling_captioner.py), so it imports nothing else from hf_captioner.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

LIBRARIES = ("timm", "torchvision")  # the libraries a backbone name may come from (transformers ones have no name)
NATIVE_OUTPUT_STRIDE = 32  # of the last feature map of every network here, undilated
OUTPUT_STRIDES = (16, NATIVE_OUTPUT_STRIDE)  # 16 dilates the last stride-2 stage instead (DeepLab's way)


def parse_backbone(spec: str) -> tuple[str, str]:
    """(library, architecture) of a backbone name as configs store it: "timm:NAME" or "torchvision:NAME"."""
    library, _, name = str(spec).partition(":")
    if library not in LIBRARIES or not name:
        raise ValueError(f"vision_backbone must be 'timm:NAME' or 'torchvision:NAME', got {spec!r}")
    return library, name


def is_backbone_name(name: str | None) -> bool:
    """Whether `name` names a timm / torchvision backbone (else it is a transformers model id or folder)."""
    return bool(name) and name.startswith(("timm:", "timm/", "torchvision:"))


def pretrained_source(name: str) -> tuple[str, str]:
    """(the name a config stores, the name the weights load from): a timm Hub id "timm/NAME" keeps the architecture
    NAME in the config and loads the weights from the Hub."""
    if name.startswith("timm/"):
        return f"timm:{name.split('/', 1)[1]}", f"timm:hf-hub:{name}"
    parse_backbone(name)
    return name, name


def dilation_kwargs(library: str, output_stride: int) -> dict:
    """What asks the library's constructor for the output stride (nothing at the native one)."""
    if output_stride == NATIVE_OUTPUT_STRIDE:
        return {}
    if library == "timm":
        return {"output_stride": output_stride}
    return {"replace_stride_with_dilation": [False, False, True]}  # torchvision: layer4 of a bottleneck ResNet


def check_output_stride(spec: str, output_stride: int) -> None:
    """Refuses, naming the setting, a network that cannot give `output_stride`. It builds the network's skeleton on
    the meta device (no weights, no download, no random numbers drawn), so it can run before anything is fetched."""
    if output_stride == NATIVE_OUTPUT_STRIDE:
        return
    library, name = parse_backbone(spec)
    refusal = f"vision_backbone={spec!r} cannot run at vision_output_stride={output_stride}"
    if library == "torchvision":
        refusal += (
            ": of torchvision's networks only bottleneck ResNets (ResNet-50 and deeper, ResNeXt, Wide ResNet) "
            "dilate their last stage"
        )
    else:
        refusal += ": timm does not dilate this network"
    try:
        with torch.device("meta"):
            network = create_network(library, name, pretrained=False, output_stride=output_stride)
    except (TypeError, AssertionError, NotImplementedError) as err:
        raise ValueError(f"{refusal} ({err})") from None
    info = getattr(network, "feature_info", None)  # a timm network that takes the argument but ignores it
    if library == "timm" and not (info and info[-1]["reduction"] == output_stride):
        raise ValueError(f"{refusal} (its last map stays at stride {NATIVE_OUTPUT_STRIDE})")


def create_network(library: str, name: str, pretrained: bool, output_stride: int, **load_kwargs) -> nn.Module:
    """The whole network (classifier included) from its library."""
    if library == "timm":
        try:
            import timm
        except ImportError:
            raise ImportError(f"vision_backbone='timm:{name}' needs the timm package: pip install timm") from None
        return timm.create_model(name, pretrained=pretrained, **dilation_kwargs(library, output_stride), **load_kwargs)
    try:
        import torchvision
    except ImportError:
        raise ImportError(f"vision_backbone='torchvision:{name}' needs the torchvision package") from None
    weights = load_kwargs.get("weights", "DEFAULT") if pretrained else None
    return torchvision.models.get_model(name, weights=weights, **dilation_kwargs(library, output_stride))


def build_backbone(
    spec: str, pretrained: bool = False, output_stride: int = NATIVE_OUTPUT_STRIDE, **load_kwargs
) -> tuple[nn.Module, int]:
    """A timm or torchvision network cut to its last feature map, with its channel count. Saved captioners rebuild
    it randomly initialised (their checkpoint holds the weights); `pretrained` (timm: also `checkpoint_path=...`;
    torchvision: `weights=...`) is for starting a new captioner. At `output_stride` 16 the last stride-2 stage
    dilates instead: the weights are the same, so a stride-32 checkpoint loads into it."""
    library, name = parse_backbone(spec)  # a timm name may be a Hub source, "hf-hub:timm/NAME"
    check_output_stride(spec, output_stride)
    network = create_network(library, name, pretrained, output_stride, **load_kwargs)
    if library == "timm":
        network.reset_classifier(0, "")  # keep the trunk (and EfficientNet's conv_head): no pooling, no classifier
        return network, network.num_features
    if hasattr(network, "features"):  # VGG, EfficientNet, MobileNet, DenseNet, ConvNeXt
        trunk = network.features
    else:  # ResNet-like: everything before global pooling and the classifier
        children = dict(network.named_children())
        trunk = nn.Sequential(OrderedDict((k, v) for k, v in children.items() if k not in ("avgpool", "fc")))
    with torch.no_grad():
        channels = trunk.eval()(torch.zeros(1, 3, 64, 64)).shape[1]
    return trunk, channels


def last_feature_map(library: str, backbone: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The backbone's last feature map (B, C, H, W)."""
    if library == "transformers":
        return backbone(pixel_values).feature_maps[-1]
    if library == "timm":
        return backbone.forward_features(pixel_values)
    return backbone(pixel_values)


def backbone_stages(library: str, backbone: nn.Module) -> list[nn.Module] | None:
    """The backbone's stages in order (stem excluded), for fine-tuning the last few; None where they are not found."""
    if library == "timm":
        return [backbone.get_submodule(info["module"]) for info in backbone.feature_info][1:]
    if library == "torchvision":
        named = dict(backbone.named_children())
        layers = [named[n] for n in ("layer1", "layer2", "layer3", "layer4") if n in named]
        return layers or list(backbone.children())[1:]
    num_stages = len([name for name in backbone.stage_names if name != "stem"])
    for module in backbone.modules():  # found by its length, so any transformers backbone family works
        if isinstance(module, nn.ModuleList) and len(module) == num_stages:
            return list(module)
    return None


def modules_after(backbone: nn.Module, module: nn.Module) -> list[nn.Module]:
    """The backbone's top-level children that come after the one holding `module` (e.g. EfficientNet's conv_head)."""
    children = list(backbone.children())
    holder = next(i for i, child in enumerate(children) if any(m is module for m in child.modules()))
    return children[holder + 1 :]


HEAD_NAMES = ("global_pool", "classifier", "fc", "head", "head_drop", "pre_logits")  # timm: after the feature map


def layer_sequence(library: str, backbone: nn.Module) -> list[nn.Module] | None:
    """The backbone's way to its last feature map as layers applied one after another (stage containers unrolled
    one level), so that it can run from any stage onwards; None where the backbone is not built so (transformers
    backbones, timm networks whose head holds more convolutions). Checked on one small input against
    `last_feature_map`."""
    if library == "transformers":
        return None
    named = backbone.named_children()
    children = [module for name, module in named if library == "torchvision" or name not in HEAD_NAMES]
    layers = [layer for child in children for layer in (child if isinstance(child, nn.Sequential) else [child])]
    modes = {module: module.training for module in backbone.modules()}
    backbone.eval()
    try:
        with torch.no_grad():
            x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
            expected = last_feature_map(library, backbone, x)
            same = run_layers(layers, x)
            same = same.shape == expected.shape and torch.allclose(same, expected)
    except RuntimeError:  # a layer that is not applied in sequence (shapes do not fit)
        same = False
    finally:
        for module, mode in modes.items():
            module.training = mode
    return layers if same else None


def run_layers(layers: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def top_layers_start(layers: list[nn.Module], stages: list[nn.Module], num_stages: int) -> int:
    """Where the last `num_stages` of `stages` begin in the `layers` of `layer_sequence`: right after the last layer
    of the stage before them (timm's stage modules mark where a stride ends, so the blocks between two marks belong to
    the later stage), or at the first stage when all of them train."""

    def overlaps(layer: nn.Module, stage: nn.Module) -> bool:
        return any(m is stage for m in layer.modules()) or any(m is layer for m in stage.modules())

    if num_stages >= len(stages):
        return next(i for i, layer in enumerate(layers) if overlaps(layer, stages[0]))
    last_frozen = stages[len(stages) - num_stages - 1]
    return max(i for i, layer in enumerate(layers) if overlaps(layer, last_frozen)) + 1


def image_settings(name: str | None) -> dict:
    """The normalisation, crop ratio and interpolation a backbone was trained with (ImageNet defaults for
    transformers backbones and for no name)."""
    settings = {
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "crop_pct": 0.875,
        "interpolation": "bicubic",
    }
    if not is_backbone_name(name):
        return settings
    library, architecture = parse_backbone(pretrained_source(name)[0])
    if library == "timm":
        import timm

        config = (
            timm.get_pretrained_cfg(architecture) or timm.create_model(architecture, pretrained=False).pretrained_cfg
        )
        config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        settings.update({k: config[k] for k in ("mean", "std", "crop_pct", "interpolation") if config.get(k)})
    else:
        import torchvision

        transforms = torchvision.models.get_model_weights(architecture).DEFAULT.transforms()
        settings.update(
            mean=tuple(transforms.mean),
            std=tuple(transforms.std),
            crop_pct=transforms.crop_size[0] / transforms.resize_size[0],
            interpolation=transforms.interpolation.value,
        )
    return settings
