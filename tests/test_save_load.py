"""Save -> load: the Auto classes in this process, and `trust_remote_code` in a process without hf_captioner."""

import json
import os
import subprocess
import sys
import textwrap

import torch
from conftest import tiny_model
from PIL import Image
from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, GenerationConfig

from hf_captioner import CaptionerForConditionalGeneration, CaptionerImageProcessor, CaptionerProcessor


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
    assert {"configuration_captioner.py", "modeling_captioner.py", "processing_captioner.py"} <= files
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
    inputs = processor(images=pictures(), text=["a red circle", "a blue square", "two stars"], return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], loaded_processor(images=pictures(), return_tensors="pt")["pixel_values"])
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in loaded.state_dict().items())
    with torch.no_grad():  # same weights; only BLAS summation order (memory alignment) may differ in the last bit
        torch.testing.assert_close(loaded(**inputs).logits, model(**inputs).logits, rtol=0, atol=1e-6)
    ids = model.generate(pixel_values=inputs["pixel_values"], num_beams=3)
    assert torch.equal(loaded.generate(pixel_values=inputs["pixel_values"]), ids)  # saved default: 3 beams
    assert loaded_processor.batch_decode(ids) == processor.batch_decode(ids)


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_captioner"] = None  # this process must not be able to import the package
    try:
        import hf_captioner  # noqa: F401
        raise SystemExit("hf_captioner is importable")
    except ImportError:
        pass
    import torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor
    folder, images = sys.argv[1], sys.argv[2:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=[Image.open(p) for p in images], text=["a red circle"] * len(images), return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    ids = model.generate(pixel_values=inputs["pixel_values"])
    print(json.dumps({"model_module": type(model).__module__, "logits": logits.tolist(),
                      "captions": processor.batch_decode(ids), "ids": ids.tolist()}))
    """
)


def test_trust_remote_code_loads_in_a_process_that_cannot_import_hf_captioner(tmp_path, tiny_tokenizer):
    model, processor = saved_captioner(tmp_path / "model", tiny_tokenizer)
    paths = []
    for i, picture in enumerate(pictures()):
        paths.append(str(tmp_path / f"{i}.png"))
        picture.save(paths[-1])
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run(
        [sys.executable, "-c", REMOTE_SCRIPT, str(tmp_path / "model"), *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    remote = json.loads(result.stdout.strip().splitlines()[-1])
    assert remote["model_module"].startswith("transformers_modules.")
    inputs = processor(images=[Image.open(p) for p in paths], text=["a red circle"] * 3, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(remote["logits"]), model(**inputs).logits, rtol=0, atol=1e-6)
    ids = model.generate(pixel_values=inputs["pixel_values"])
    assert remote["ids"] == ids.tolist()
    assert remote["captions"] == processor.batch_decode(ids)
