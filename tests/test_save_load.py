"""Save -> load: the Auto classes in this process, and `trust_remote_code` in a process without hf_captioner."""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import tiny_model
from packaging.requirements import Requirement
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from hf_captioner import CaptionerForConditionalGeneration, CaptionerImageProcessor, CaptionerProcessor
from hf_captioner.hub import load_without_package
from hf_captioner.model_card import TESTED_TRANSFORMERS


def saved_captioner(folder, tokenizer):
    model = tiny_model(seed=4, initializer_range=0.3, vocab_size=len(tokenizer))
    image_processor = CaptionerImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    processor = CaptionerProcessor(image_processor, tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, processor


def pictures():
    rng = torch.Generator().manual_seed(0)
    arrays = (torch.rand(3, 48, 64, 3, generator=rng) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(a) for a in arrays]


def test_save_writes_safetensors_code_auto_map_and_generation_defaults(tmp_path, tiny_tokenizer):
    saved_captioner(tmp_path, tiny_tokenizer)
    files = set(os.listdir(tmp_path))
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json"} <= files
    assert {"configuration_captioner.py", "modeling_captioner.py", "processing_captioner.py", "backbones.py"} <= files
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert (
        auto_map["AutoModel"]
        == auto_map["AutoModelForImageTextToText"]
        == ("modeling_captioner.CaptionerForConditionalGeneration")
    )
    assert "AutoProcessor" in json.loads((tmp_path / "processor_config.json").read_text())["auto_map"]
    generation = GenerationConfig.from_pretrained(tmp_path)
    assert generation.num_beams == 3 and generation.max_new_tokens == 31
    assert generation.decoder_start_token_id == 1 and generation.eos_token_id == 2 and generation.pad_token_id == 0


def test_auto_classes_load_identical_logits_and_captions(tmp_path, tiny_tokenizer):
    model, processor = saved_captioner(tmp_path, tiny_tokenizer)
    loaded = AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is CaptionerForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_pretrained(tmp_path)) is CaptionerForConditionalGeneration
    loaded_processor = AutoProcessor.from_pretrained(tmp_path)
    assert type(loaded_processor) is CaptionerProcessor
    inputs = processor(
        images=pictures(), text_target=["a red circle", "a blue square", "two stars"], return_tensors="pt"
    )
    assert torch.equal(inputs["pixel_values"], loaded_processor(images=pictures(), return_tensors="pt")["pixel_values"])
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    with torch.no_grad():  # same weights; only BLAS summation order (memory alignment) may differ in the last bit
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
    ids = model.generate(pixel_values=inputs["pixel_values"], num_beams=3)
    assert torch.equal(loaded.generate(pixel_values=inputs["pixel_values"]), ids)  # saved default: 3 beams
    assert loaded_processor.batch_decode(ids) == processor.batch_decode(ids)


def test_tested_transformers_versions_are_the_declared_range_and_the_pin():
    """The model card's tested versions are the ones the test below runs: pyproject's lower bound and the pin."""
    declared = [Requirement(line) for line in importlib.metadata.requires("hf_captioner")]
    specifier = next(r.specifier for r in declared if r.name == "transformers" and not r.marker)
    assert [s.version for s in specifier if s.operator == ">="] == [TESTED_TRANSFORMERS[0]]
    constraints = (Path(__file__).resolve().parents[1] / "constraints.txt").read_text().splitlines()
    assert f"transformers=={TESTED_TRANSFORMERS[-1]}" in constraints
    assert transformers.__version__ == TESTED_TRANSFORMERS[-1], "make test installs the pinned transformers"


def transformers_release(version: str) -> Path | None:
    """A folder holding transformers `version` alone (`pip install --no-deps --target`), to go first on a child
    process's path; kept under the virtual environment for later runs. None for the installed version."""
    if version == transformers.__version__:
        return None
    folder = Path(sys.prefix) / "compat" / f"transformers-{version}"
    if not (folder / "transformers" / "__init__.py").is_file():
        partial = folder.with_name(folder.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--target",
                str(partial),
                f"transformers=={version}",
            ],
            check=True,
            timeout=600,
        )
        partial.rename(folder)  # only a complete install is ever reused
    return folder


@pytest.mark.parametrize("version", TESTED_TRANSFORMERS)
def test_trust_remote_code_loads_in_a_process_that_cannot_import_hf_captioner(tmp_path, tiny_tokenizer, version):
    """A saved folder runs its own copied code under the user's transformers: each tested release gives the captions
    (beam, greedy, sampled) and logits of this process."""
    model, processor = saved_captioner(tmp_path / "model", tiny_tokenizer)
    paths = []
    for i, picture in enumerate(pictures()):
        paths.append(tmp_path / f"{i}.png")
        picture.save(paths[-1])
    remote = load_without_package(tmp_path / "model", paths, transformers_dir=transformers_release(version))
    assert remote["transformers"] == version
    assert remote["module"].startswith("transformers_modules.")
    pixel_values = processor(images=[Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    ids = model.generate(pixel_values=pixel_values)
    assert remote["ids"] == ids.tolist()
    assert remote["captions"] == processor.batch_decode(ids)
    assert remote["greedy"] == remote["uncached"] == model.generate(pixel_values=pixel_values, num_beams=1).tolist()
    assert remote["greedy_cache"] == "CaptionerCache", "generate did not carry the model's cache from step to step"
    torch.manual_seed(0)
    assert remote["sampled"] == model.generate(pixel_values=pixel_values, num_beams=1, do_sample=True).tolist()
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=ids).logits
    torch.testing.assert_close(torch.tensor(remote["logits"]), logits, rtol=0, atol=1e-6)


def test_a_loaded_model_keeps_the_encoder_freezing_of_its_config(tmp_path):
    for stages in (0, 1):
        model = tiny_model(encoder_trainable_stages=stages)
        model.save_pretrained(tmp_path / str(stages))
        loaded = CaptionerForConditionalGeneration.from_pretrained(tmp_path / str(stages))
        expected = {name: p.requires_grad for name, p in model.named_parameters()}
        assert {name: p.requires_grad for name, p in loaded.named_parameters()} == expected
        assert loaded.encoder.is_frozen == (stages == 0)
    overridden = CaptionerForConditionalGeneration.from_pretrained(tmp_path / "0", encoder_trainable_stages=-1)
    assert all(p.requires_grad for p in overridden.encoder.parameters())


def test_weights_that_are_not_finite_are_refused_when_loading(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["decoder.cell.weight_hh"][3, 5] = float("nan")  # as a flipped exponent bit in the file would make it
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="decoder.cell.weight_hh.*corrupt"):
        CaptionerForConditionalGeneration.from_pretrained(tmp_path)


def test_a_config_without_its_grid_size_is_refused_not_loaded_as_the_default(tmp_path):
    """Nothing in the weights records the grid: a config.json that lost it must not load as 14 x 14 regions."""
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.pop("grid_size") != 14
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no grid_size"):
        CaptionerForConditionalGeneration.from_pretrained(tmp_path)
    assert CaptionerForConditionalGeneration.from_pretrained(tmp_path, grid_size=3).config.grid_size == 3
