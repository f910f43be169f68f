"""The console commands as a new user meets them: from a folder outside the checkout, with relative paths; one error
contract (bad input: one line, exit 2; nothing done: exit 1; partial success: exit 0 with the skips counted); local
copies of Hub data sets; large photos with attention figures."""

import json
import os
import subprocess

import numpy as np
import pytest
from conftest import HF_CAPTIONER, write_truncated_jpeg
from PIL import Image

from hf_captioner import __version__
from hf_captioner.data import detect_and_load, make_sample_dataset
from hf_captioner.visualize import PREVIEW_PIXELS, panel_axes, plot_attention

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def hf_captioner(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([HF_CAPTIONER, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


def refused_in_one_line(result: subprocess.CompletedProcess, *words: str) -> str:
    """The last stderr line of a command refused as bad input: exit 2, no traceback, naming `words`."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert all(word in line for word in words), line
    return line


def test_version_and_help_that_shows_defaults(tmp_path):
    assert hf_captioner("--version", cwd=tmp_path).stdout.strip() == f"hf-captioner {__version__}"
    for command, default in (("caption", "(default: 3)"), ("evaluate", "(default: test)")):
        assert default in hf_captioner(command, "--help", cwd=tmp_path).stdout.replace("\n", " ")
    refused_in_one_line(hf_captioner("nothing", cwd=tmp_path), "unknown command")


def test_evaluate_refuses_bad_data_and_settings_in_one_line(trained_tiny_model, tmp_path):
    model = os.path.relpath(trained_tiny_model, tmp_path)
    (tmp_path / "empty").mkdir()
    refused_in_one_line(hf_captioner("evaluate", "--model", model, "--data", "/nothere", cwd=tmp_path), "/nothere")
    refused_in_one_line(
        hf_captioner("evaluate", "--model", model, "--data", "empty", cwd=tmp_path), "empty", "no known caption layout"
    )
    # refused before anything loads: no model folder is needed to hear it
    refused_in_one_line(
        hf_captioner("evaluate", "--model", "none", "--repetition-penalty", "0", cwd=tmp_path), "--repetition_penalty"
    )
    first = hf_captioner(
        "evaluate", "--model", model, "--max-images", "2", "--no_meteor", "--output_dir", "scores", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr[-2000:]
    again = ("evaluate", "--model", model, "--max_images", "2", "--no_meteor", "--output_dir", "scores")
    refused_in_one_line(hf_captioner(*again, cwd=tmp_path), "already holds an evaluation", "--overwrite_output_dir")
    assert hf_captioner(*again, "--overwrite_output_dir", cwd=tmp_path).returncode == 0


def test_caption_searches_sub_folders_and_exits_1_when_nothing_could_be_read(trained_tiny_model, tmp_path):
    model = os.path.relpath(trained_tiny_model, tmp_path)
    (tmp_path / "photos" / "holiday").mkdir(parents=True)
    make_sample_dataset(0, 0, 1, seed=3, image_size=32)["test"][0]["image"].save(tmp_path / "photos/holiday/a.png")
    found = hf_captioner("caption", "--model", model, "photos", "--num-beams", "2", cwd=tmp_path)
    assert found.returncode == 0 and found.stdout.startswith("photos/holiday/a.png\t"), found.stderr[-2000:]
    (tmp_path / "broken").mkdir()
    write_truncated_jpeg(tmp_path / "broken" / "b.jpg")
    nothing = hf_captioner("caption", "--model", model, "broken", cwd=tmp_path)
    assert nothing.returncode == 1 and not nothing.stdout and "nothing captioned" in nothing.stderr
    refused_in_one_line(hf_captioner("caption", "--model", model, "nowhere.jpg", cwd=tmp_path), "nowhere.jpg")


def jxie_style_splits(seed: int = 0):
    """A small data set with jxie/flickr8k's columns: an image, caption_0 .. caption_4."""
    from datasets import Dataset, DatasetDict
    from datasets import Image as ImageFeature

    sample = make_sample_dataset(6, 3, 3, seed=seed, image_size=32)
    splits = {}
    for split, rows in sample.items():
        columns = {"image": list(rows["image"])}
        for i in range(5):
            columns[f"caption_{i}"] = [captions[i % len(captions)] for captions in rows["captions"]]
        splits[split] = Dataset.from_dict(columns).cast_column("image", ImageFeature())
    return DatasetDict(splits)


@pytest.mark.parametrize("form", ["parquet folder", "arrow folder", "save_to_disk", "parquet file"])
def test_a_local_copy_of_a_hub_data_set_reads_with_its_preset(tmp_path, form):
    splits = jxie_style_splits()
    target = tmp_path / "flickr8k-copy"
    if form == "save_to_disk":
        splits.save_to_disk(str(target))
    elif form == "parquet file":
        target = tmp_path / "test.parquet"
        splits["test"].to_parquet(str(target))
    else:
        (target / "data").mkdir(parents=True)
        for split, rows in splits.items():  # named as the Hub names them
            if form == "parquet folder":
                rows.to_parquet(str(target / "data" / f"{split}-00000-of-00001.parquet"))
            else:
                rows.flatten_indices().save_to_disk(str(tmp_path / "arrow" / split))
                arrow = next((tmp_path / "arrow" / split).glob("*.arrow"))
                arrow.rename(target / "data" / f"{split}-00000-of-00001.arrow")
    from hf_captioner.data import hub_layout

    data = detect_and_load(target, layout=hub_layout(str(target), {"data_preset": "jxie/flickr8k"}))
    expected = {"train": 6, "validation": 3, "test": 3} if form != "parquet file" else {"train": 3}
    assert {split: len(rows) for split, rows in data.items() if len(rows)} == expected
    first = data["train"][0]
    assert len(first["captions"]) == 5 and first["image"].size == (32, 32)


def test_evaluate_reads_a_local_parquet_copy_from_the_command_line(trained_tiny_model, tmp_path):
    (tmp_path / "copy" / "data").mkdir(parents=True)
    for split, rows in jxie_style_splits().items():
        rows.to_parquet(str(tmp_path / "copy" / "data" / f"{split}-00000-of-00001.parquet"))
    model = os.path.relpath(trained_tiny_model, tmp_path)
    without = hf_captioner("evaluate", "--model", model, "--data", "copy", "--no_meteor", cwd=tmp_path)
    refused_in_one_line(without, "caption_columns")  # the default layout has a "caption" column, this one has not
    result = hf_captioner(
        "evaluate",
        "--model",
        model,
        "--data",
        "copy",
        "--data_preset",
        "jxie/flickr8k",
        "--no_meteor",
        "--output_dir",
        "scores",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((tmp_path / "scores" / "metrics.json").read_text())["images"] == 3


def test_a_binary_file_is_not_read_as_a_captions_csv(tmp_path):
    (tmp_path / "captions.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="not a UTF-8 text file"):
        detect_and_load(tmp_path / "captions.bin")


def test_the_attention_figure_of_a_huge_photo_is_drawn_from_a_bounded_preview():
    """A 6000 x 4000 photo: panels draw a preview no larger than PREVIEW_PIXELS, in the photo's own coordinates
    (boxes from the annotations land where they belong), under a title with the caption and beside a colour scale."""
    photo = Image.new("RGB", (6000, 4000), (250, 250, 250))
    attention = np.full((7, 7), 1 / 49)
    attention[3, 3] = 0.5
    figure = plot_attention(photo, ["a", "dog"], [attention, attention], boxes=[None, [(100, 100, 2999, 1999)]])
    panels = panel_axes(figure)
    for axes in panels:
        for drawn in axes.images:
            assert max(drawn.get_array().shape[:2]) <= PREVIEW_PIXELS
            assert drawn.get_extent() == [-0.5, 5999.5, 3999.5, -0.5]
    assert [len(axes.patches) for axes in panels] == [0, 1] and figure.get_suptitle() == "a dog"
    assert len(figure.axes) == len(panels) + 1  # the colour scale
