"""The transformers pipeline on a saved captioner, and the README's usage snippets run as written."""

from pathlib import Path

import pytest
import torch
from conftest import python_snippets, run_snippets_without_package
from transformers import pipeline

from hf_captioner import CaptionerForConditionalGeneration, CaptionerProcessor
from hf_captioner.data import make_sample_dataset

REPO = Path(__file__).resolve().parents[1]


def pictures(count: int = 3):
    return list(make_sample_dataset(0, 0, count, seed=5, image_size=32)["test"]["image"])


@pytest.fixture(scope="module")
def saved(trained_tiny_model):
    model = CaptionerForConditionalGeneration.from_pretrained(trained_tiny_model).eval()
    return model, CaptionerProcessor.from_pretrained(trained_tiny_model)


def captions(model, processor, images, **generate_kwargs) -> list[str]:
    with torch.no_grad():
        return processor.batch_decode(
            model.generate(**processor(images=images, return_tensors="pt"), **generate_kwargs)
        )


@pytest.mark.parametrize("task", ["image-text-to-text", "image-to-text"])  # both reach the folder's pipeline class
def test_the_pipeline_without_a_prompt_captions_exactly_as_generate(trained_tiny_model, saved, task, tmp_path):
    captioner = pipeline(task, model=str(trained_tiny_model), trust_remote_code=True)
    assert type(captioner).__name__ == "CaptionerPipeline"
    images = pictures()
    expected = captions(*saved, images)  # the saved generation config: 3 beams
    one = captioner(images[0], text="")
    assert [record["generated_text"] for record in one] == expected[:1]
    images[0].save(tmp_path / "photo.png")  # the first call a user types: a picture alone, by path or as an object
    for alone in (str(tmp_path / "photo.png"), images[0]):
        assert [record["generated_text"] for record in captioner(alone)] == expected[:1]
    assert [record["generated_text"] for record in captioner(images)] == expected
    batch = captioner(images, text=[""] * len(images), batch_size=len(images))
    assert [record["generated_text"] for record in batch] == expected
    short = captioner(images[0], text="", generate_kwargs={"max_new_tokens": 2, "num_beams": 1})
    assert short[0]["generated_text"] == captions(*saved, images[:1], max_new_tokens=2, num_beams=1)[0]


def test_a_prompt_is_the_forced_start_of_the_caption(trained_tiny_model, saved):
    captioner = pipeline("image-text-to-text", model=str(trained_tiny_model), trust_remote_code=True)
    image = pictures(1)[0]
    greedy = captions(*saved, [image], num_beams=1)[0]
    start = greedy.split()[0]  # the model's own first word: greedy decoding from it must give the same caption
    assert captioner(image, text=start, generate_kwargs={"num_beams": 1})[0]["generated_text"] == greedy
    model, processor = saved
    inputs = processor(images=[image], text="the purple", return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, num_beams=1)
    assert ids[0, :3].tolist() == inputs["decoder_input_ids"][0].tolist()  # <s> the purple, then the model's words
    forced = captioner(image, text="the purple", generate_kwargs={"num_beams": 1})[0]["generated_text"]
    assert forced == processor.decode(ids[0]) and forced.startswith("the purple")
    with pytest.raises(ValueError, match="vocabulary: 'zebra' .*text=\"\""):
        captioner(image, text="the zebra")


def test_the_readme_usage_snippets_run_as_written(trained_tiny_model, tmp_path):
    """Against a tiny saved model standing where the README's run puts one."""
    section = (REPO / "README.md").read_text().split("## Use a trained captioner")[1].split("\n## ")[0]
    snippets = python_snippets(section)
    assert len(snippets) == 2 and "pipeline(" in snippets[0]
    (tmp_path / "runs" / "sample").mkdir(parents=True)
    (tmp_path / "runs" / "sample" / "final").symlink_to(trained_tiny_model)
    pictures(1)[0].save(tmp_path / "photo.png")
    (free, prompted), (generated,) = run_snippets_without_package(snippets, tmp_path)
    assert free[0]["generated_text"] == generated[0]  # the pipeline and generate() agree
    assert prompted[0]["generated_text"].startswith("a red")
