"""Evaluation, captioning with attention figures, the model card and the publishing dry run, on a trained model."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import HF_CAPTIONER, python_snippets, run_snippets_without_package, tiny_arguments, write_truncated_jpeg
from PIL import Image
from transformers import AutoModel, AutoProcessor

from hf_captioner.attention_measures import cell_centres
from hf_captioner.data import make_sample_dataset, write_sample_dataset
from hf_captioner.evaluation import repetition_rates
from hf_captioner.hub import load_without_package, stage_for_hub
from hf_captioner.inference import word_attention
from hf_captioner.model_card import TESTED_TRANSFORMERS, card_data, check_model_card, render_model_card
from hf_captioner.training import train
from hf_captioner.visualize import DPI, PANEL_INCHES, attention_overlay, panel_axes, plot_attention

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_command(name: str, *args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [HF_CAPTIONER, name, *args], capture_output=True, text=True, env=env or ENV, cwd=cwd or REPO, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def test_evaluation_and_captioning_do_not_import_the_trainer():
    """Layers point down: scoring and captioning build on inference, never on the training loop."""
    code = (
        "import sys, hf_captioner.evaluation, hf_captioner.inference, hf_captioner.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('hf_captioner.')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, check=True).stdout
    assert "hf_captioner.inference" in loaded and "hf_captioner.training" not in loaded
    assert "hf_captioner.self_critical" not in loaded


@pytest.fixture(scope="module")
def evaluated(trained_tiny_model, tmp_path_factory):
    """evaluate.py run twice on the sample test split of the tiny model's own run."""
    outputs = [tmp_path_factory.mktemp("eval") for _ in range(2)]
    for output in outputs:
        run_command(
            "evaluate",
            "--model",
            str(trained_tiny_model),
            "--data",
            "sample",
            "--split",
            "test",
            "--num_beams",
            "2",
            "--no_meteor",
            "--output_dir",
            str(output),
        )
    return outputs


def test_evaluate_writes_predictions_and_metrics_deterministically(evaluated):
    first, second = evaluated
    predictions = [json.loads(line) for line in (first / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 8 and {"image_id", "caption", "references"} <= set(predictions[0])
    assert all(isinstance(p["references"], list) and p["references"] for p in predictions)
    metrics = json.loads((first / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["num_beams"] == 2 and metrics["images"] == 8
    assert {"bleu_1", "bleu_4", "rouge_l", "cider"} <= set(metrics["metrics"])
    assert "meteor" not in metrics["metrics"]
    assert set(metrics["repetition"]) == {"repeated_bigram_rate", "repeated_trigram_rate"}
    assert {
        "pointing_accuracy",
        "pointing_chance",
        "pointing_nouns",
        "attention_in_boxes",
        "normalised_entropy",
        "peak_moves",
    } <= set(metrics["attention"])
    for name in ("predictions.jsonl", "metrics.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_caption_script_draws_one_panel_per_word_and_skips_a_bad_picture(trained_tiny_model, tmp_path):
    data = make_sample_dataset(0, 0, 2, seed=11, image_size=32)["test"]
    folder = tmp_path / "pictures"
    folder.mkdir()
    for i, image in enumerate(data["image"]):
        image.save(folder / f"pic{i}.png")
    write_truncated_jpeg(folder / "pic0b.jpg")  # between the two good ones
    result = run_command(
        "caption",
        "--model",
        str(trained_tiny_model),
        str(folder),
        "--attention",
        str(tmp_path / "figures"),
        "--num_beams",
        "2",
    )
    lines = [line.split("\t") for line in result.stdout.strip().splitlines()]
    assert [Path(line[0]).name for line in lines] == ["pic0.png", "pic1.png"]
    assert "pic0b.jpg" in result.stderr and "1 of 3 picture(s) could not be read" in result.stderr
    for _, caption, figure in lines:
        words = caption.split()
        columns, rows = min(len(words), 5), math.ceil(len(words) / 5)
        panel = PANEL_INCHES * DPI
        assert Image.open(figure).size == (round(columns * panel), round(rows * panel))


def test_a_model_folders_own_code_runs_only_when_trusted(trained_tiny_model, tmp_path):
    """Commands load folders of this package with its own code; a folder naming another model type runs its
    copied code only with --trust_remote_code; a bad --model is one line, not a traceback."""
    folder = tmp_path / "foreign"
    shutil.copytree(trained_tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "someone_elses_captioner"}))
    marker = tmp_path / "marker"
    with open(folder / "modeling_captioner.py", "a") as handle:
        handle.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    picture = tmp_path / "picture.png"
    make_sample_dataset(0, 0, 1, seed=3, image_size=32)["test"][0]["image"].save(picture)
    command = [HF_CAPTIONER, "caption", "--model", str(folder), str(picture)]
    refused = subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=600)
    assert refused.returncode == 2 and "custom code" in refused.stderr.splitlines()[-1] and not marker.exists()
    run_command("caption", *command[2:], "--trust_remote_code")
    assert marker.exists()
    missing = subprocess.run(
        [HF_CAPTIONER, "evaluate", "--model", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
        env=ENV,
        timeout=600,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.splitlines()[-1].endswith("not a saved model folder (no config.json)")


def test_attention_figure_and_word_maps(trained_tiny_model):
    model = AutoModel.from_pretrained(trained_tiny_model).eval()
    processor = AutoProcessor.from_pretrained(trained_tiny_model)
    image = make_sample_dataset(0, 0, 1, seed=3, image_size=32)["test"][0]["image"]
    pixel_values = processor.image_processor(image, return_tensors="pt")["pixel_values"]
    sequences = model.generate(pixel_values=pixel_values, num_beams=2, max_new_tokens=8)
    words = word_attention(model, processor, {"pixel_values": pixel_values}, sequences)[0]
    assert [w.word for w in words] == processor.batch_decode(sequences)[0].split()
    for item in words:
        assert item.attention.shape == (2, 2) and item.attention.sum() == pytest.approx(1.0, abs=1e-5)
    figure = plot_attention(image, [w.word for w in words], [w.attention for w in words])
    assert len(panel_axes(figure)) == len(words)
    assert [axes.get_title() for axes in panel_axes(figure)] == [w.word for w in words]
    assert figure.get_suptitle() == " ".join(w.word for w in words)


@pytest.mark.parametrize("size", [(1, 1), (4000, 10)])
def test_attention_figures_of_extreme_picture_shapes(size):
    attention = np.full((2, 2), 0.25)
    attention[0, 0] = 0.4
    overlay = attention_overlay(Image.new("RGB", size, (9, 9, 9)), attention)
    assert overlay.shape == (size[1], size[0]) and overlay.max() == pytest.approx(1.0)
    assert len(panel_axes(plot_attention(Image.new("RGB", size), ["a", "dot"], [attention, attention]))) == 2


def test_grid_cells_map_back_to_picture_coordinates():
    from hf_captioner import CaptionerImageProcessor

    processor = CaptionerImageProcessor(size={"shortest_edge": 100}, crop_size={"height": 100, "width": 100})
    # a 200 x 400 picture: scaled by 1/2 to 100 x 200, then the middle 100 x 100 kept (rows 50..150 of 200)
    assert cell_centres(2, (200, 400), processor).tolist() == [
        [50.0, 150.0],
        [150.0, 150.0],
        [50.0, 250.0],
        [150.0, 250.0],
    ]


def test_model_card_renders_real_values(trained_tiny_model, evaluated, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for item in trained_tiny_model.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    (folder / "eval-test-beam2").mkdir()
    (folder / "eval-test-beam2" / "metrics.json").write_bytes((evaluated[0] / "metrics.json").read_bytes())
    card = render_model_card(folder, repo_id="me/tiny")
    header = yaml.safe_load(card.split("---")[1])
    assert header["pipeline_tag"] == "image-text-to-text" and header["library_name"] == "transformers"
    metrics = json.loads((evaluated[0] / "metrics.json").read_text())["metrics"]
    reported = {m["type"]: m["value"] for m in header["model-index"][0]["results"][0]["metrics"]}
    assert reported["cider"] == round(100 * metrics["cider"], 2) and reported["bleu"] == round(
        100 * metrics["bleu_4"], 2
    )
    assert f"{100 * metrics['cider']:.1f}" in card and "me/tiny" in card and "${" not in card
    assert "Show, Attend and Tell" in card and "hodosh2013framing" not in card  # trained on the sample set
    assert "never shown a photograph" in card
    saved_with = json.loads((folder / "config.json").read_text())["transformers_version"]
    assert f"saved with transformers {saved_with}." in card.replace("\n", " ")
    assert f"tested with transformers {' and '.join(TESTED_TRANSFORMERS)}" in card.replace("\n", " ")
    training_args = json.loads((folder / "training_args.json").read_text())
    assert f"batch {training_args['batch_size']} per process" in card
    assert "`hf-captioner train --config training_args.json`" in card
    assert "datasets" not in header  # the sample data is not a Hub data set: no id the Hub cannot link
    assert "drawn pictures" in card and "does not describe one" in card and "everyday photographs" not in card
    assert "% of its captions repeat a word bigram (test split, 2 beams)" in card
    (folder / "README.md").write_text(card)
    assert len(check_model_card(folder / "README.md").data.eval_results) == len(reported)
    assert "![" not in card  # no figure saved with the model, none shown
    (folder / "attention").mkdir()
    Image.new("RGB", (8, 8)).save(folder / "attention" / "0001.png")
    staged = stage_for_hub(folder, tmp_path / "stage", "me/tiny")
    assert (staged / "attention" / "0001.png").is_file()
    assert "![Where the model looked for each word](attention/0001.png)" in (staged / "README.md").read_text()


def test_the_card_of_a_short_run_on_a_written_sample_folder_says_what_it_is(tmp_path, monkeypatch):
    """Trained from a folder make-sample-data wrote (by a relative path, which elsewhere looks like a Hub id) and
    stopped by max_train_steps: the card names the sample set and its use, cites no Flickr paper, puts no data set
    in the Hub metadata and says how long the run was."""
    monkeypatch.chdir(tmp_path)
    write_sample_dataset("shapes", 24, 8, 4, seed=0, image_size=32)
    train(tiny_arguments(tmp_path / "run", data="shapes", max_train_steps=3))
    monkeypatch.chdir(REPO)  # rendered elsewhere, as publish does
    card = render_model_card(tmp_path / "run" / "final", repo_id="me/shapes")
    header = yaml.safe_load(card.split("---")[1])
    assert "datasets" not in header and "never shown a photograph" in card and "everyday photographs" not in card
    assert "hodosh2013framing" not in card and "young2014image" not in card
    assert "At most 3 optimizer steps" in card and "epochs at most" not in card


def test_card_metadata_names_hub_data_sets_by_their_ids_and_local_data_in_prose(tmp_path):
    evaluation = {"split": "test", "num_beams": 3, "metrics": {"bleu_4": 0.2, "cider": 0.5}}
    hub = card_data([evaluation], "Flickr8k", "jxie/flickr8k", "hub", "me/sat-flickr8k")
    assert hub.datasets == ["jxie/flickr8k"] and {r.dataset_type for r in hub.eval_results} == {"jxie/flickr8k"}
    assert hub.model_name == "sat-flickr8k"  # the model-index is named after the repository
    local = card_data([evaluation], "Flickr8k", "data/flickr8k", "local", "me/sat-flickr8k")  # relative: Hub-shaped
    assert local.datasets is None and {r.dataset_name for r in local.eval_results} == {"Flickr8k"}
    assert [(r.metric_type, r.metric_value) for r in hub.eval_results] == [("bleu", 20.0), ("cider", 50.0)]


def test_publish_dry_run_writes_a_folder_that_loads_without_the_package(trained_tiny_model, tmp_path):
    """As the README prints it: from a folder outside the checkout, with relative paths."""
    out = tmp_path / "staged"
    secret = "hf_do_not_print_this_token_123"
    model = os.path.relpath(trained_tiny_model, tmp_path)
    result = run_command(
        "publish",
        "--model",
        model,
        "--repo_id",
        "me/tiny",
        "--dry_run",
        "staged",
        cwd=tmp_path,
        env={**ENV, "HF_TOKEN": secret},
    )
    assert secret not in result.stdout + result.stderr
    names = {p.name for p in out.iterdir()}
    assert {
        "README.md",
        "model.safetensors",
        "modeling_captioner.py",
        "processing_captioner.py",
        "tokenizer.json",
    } <= names
    images = []
    for i, image in enumerate(make_sample_dataset(0, 0, 3, seed=5, image_size=32)["test"]["image"]):
        images.append(tmp_path / f"{i}.png")
        image.save(images[-1])
    remote = load_without_package(out, images)
    model = AutoModel.from_pretrained(trained_tiny_model).eval()
    processor = AutoProcessor.from_pretrained(trained_tiny_model)
    pixel_values = processor(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        assert remote["ids"] == model.generate(pixel_values=pixel_values).tolist()
    assert remote["image_text_ids"] == remote["ids"] and remote["pipeline"] == remote["captions"]
    # the card's snippets, as a Hub user copies them (the repo id standing for the staged folder)
    card = (out / "README.md").read_text().replace("me/tiny", str(out))
    Image.open(images[0]).save(tmp_path / "photo.jpg")
    (piped,), (generated,) = run_snippets_without_package(python_snippets(card), tmp_path)
    assert piped[0]["generated_text"] == generated[0] == remote["captions"][0]


def test_repetition_rates_count_the_captions_that_stutter():
    rates = repetition_rates(["a boy on a skateboard on a skateboard", "a dog runs", "A dog and a dog"])
    # bigrams repeat in the first ("on a", "a skateboard") and the third ("a dog"); a trigram in the first only
    assert rates == {"repeated_bigram_rate": pytest.approx(2 / 3), "repeated_trigram_rate": pytest.approx(1 / 3)}


def test_evaluate_passes_decoding_options_to_generate(trained_tiny_model, tmp_path):
    run_command(
        "evaluate",
        "--model",
        str(trained_tiny_model),
        "--data",
        "sample",
        "--split",
        "test",
        "--max_images",
        "4",
        "--no_meteor",
        "--no_repeat_ngram_size",
        "2",
        "--output_dir",
        str(tmp_path),
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["generate_kwargs"] == {"no_repeat_ngram_size": 2}
    assert metrics["repetition"]["repeated_bigram_rate"] == 0.0  # a repeated word bigram repeats a token bigram


def test_the_card_names_the_decoder_variant_and_attention_supervision(trained_tiny_model, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(trained_tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "decoder_type": "top_down",
        "visual_sentinel": True,
        "region_encoder_layers": 2,
        "attention_supervision_weight": 0.5,
    }
    (folder / "config.json").write_text(json.dumps(config))
    card = render_model_card(folder, repo_id="me/tiny").replace("\n", " ")
    assert "Region encoder: 2 Transformer encoder layer(s)" in card
    assert "top-down LSTM pair" in card and "a visual sentinel" in card
    assert "attention supervision from boxes of the named things (lambda = 0.5)" in card
