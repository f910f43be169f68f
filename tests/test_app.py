"""The attention explorer: its captions are generate()'s, it survives bad uploads and load, its Space folder runs
without this package, and a real browser can use it (Chromium from Debian's packages, driven by Playwright)."""

import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HF_CAPTIONER
from PIL import Image

from hf_captioner import CaptionerForConditionalGeneration, CaptionerProcessor
from hf_captioner.data import make_sample_dataset

gradio = pytest.importorskip("gradio", reason="the app extra is not installed")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from hf_captioner.app import Explorer, PageFiles, build_app  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def saved(trained_tiny_model):
    model = CaptionerForConditionalGeneration.from_pretrained(trained_tiny_model).eval()
    return model, CaptionerProcessor.from_pretrained(trained_tiny_model)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    paths = []
    for i, image in enumerate(make_sample_dataset(0, 0, 3, seed=7, image_size=48)["test"]["image"]):
        paths.append(folder / f"picture{i}.png")
        image.save(paths[-1])
    return paths


def generated(saved, path: Path, **kwargs) -> str:
    model, processor = saved
    with torch.no_grad():
        ids = model.generate(**processor(images=[Image.open(path).convert("RGB")], return_tensors="pt"), **kwargs)
    return processor.batch_decode(ids)[0]


@pytest.fixture(scope="module")
def served(saved, pictures):
    """The app on a free local port, in this process; its URL."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    page = build_app(Explorer(*saved), facts="**Model** tiny", examples=[str(p) for p in pictures[:2]])
    port = free_port()
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, show_error=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    page.close()


def test_the_explorer_captions_as_generate_and_gives_each_word_its_map(saved, pictures):
    explorer = Explorer(*saved)
    picture = Image.open(pictures[0]).convert("RGB")
    captioned = explorer.caption(picture, num_beams=2, max_new_tokens=12)
    assert captioned.caption == generated(saved, pictures[0], num_beams=2, max_new_tokens=12)
    assert captioned.words == captioned.caption.split()
    for attention in captioned.maps:
        assert attention.shape == (2, 2) and attention.sum() == pytest.approx(1.0, abs=1e-5)
    first, second = (np.asarray(captioned.view(choice)) for choice in captioned.choices()[:2])
    assert first.shape == second.shape and (first != second).any()  # each word shows its own attention
    prompted = explorer.caption(picture, num_beams=1, prompt=captioned.words[0])
    assert prompted.caption.startswith(captioned.words[0])


def test_a_data_set_pictures_words_show_their_reference_boxes(saved, pictures, tmp_path):
    """With --entities, a picture known by its file name gets each word's Flickr30k Entities boxes drawn."""
    from hf_captioner.commands.app import boxes_from_entities

    picture = Image.open(pictures[0]).convert("RGB")
    entities = {"picture0.jpg": {"width": 48, "height": 48, "boxes": {"1": [[4, 4, 20, 20]]}, "phrases": []}}
    plain = Explorer(*saved).caption(picture, num_beams=2, max_new_tokens=8, name="picture0")
    named = plain.words[-1]
    entities["picture0.jpg"]["phrases"] = [[0, "1", "other", f"the {named}"]]  # the last word names box 1
    (tmp_path / "entities.json").write_text(json.dumps(entities))
    boxed = Explorer(*saved, boxes_for=boxes_from_entities(str(tmp_path / "entities.json")))
    captioned = boxed.caption(picture, num_beams=2, max_new_tokens=8, name="picture0")
    assert captioned.boxes[-1] == [(4.0, 4.0, 20.0, 20.0)]  # the picture has the annotation's size: unscaled
    last = captioned.choices()[-1]
    assert (np.asarray(captioned.view(last)) != np.asarray(plain.view(last))).any()  # drawn on its panel
    assert boxed.caption(picture, num_beams=2, max_new_tokens=8, name="unknown").boxes is None


def test_the_page_answers_through_gradio_client(served, saved, pictures):
    client = Client(served, verbose=False)
    caption, words, view = client.predict(  # the state stays on the server
        handle_file(str(pictures[1])), 3, "beam search", 30, "", api_name="/caption"
    )
    assert caption == generated(saved, pictures[1], num_beams=3, max_new_tokens=30)
    assert [label for label, _ in words["choices"]][0] == f"1. {caption.split()[0]}"
    assert Image.open(view).size[0] > 0
    grid, download = client.predict(api_name="/all_words")
    assert Image.open(grid).size == Image.open(download).size
    assert Path(download).name.startswith("attention")  # the name the download gets


def test_page_files_are_never_rewritten_and_old_ones_go(tmp_path):
    """The same view twice is two files (Gradio rewrote an in-memory image's cache file in place while another
    response was sending it: an empty download under concurrent requests); files past their age are removed."""
    files = PageFiles(max_age_s=60)
    picture = Image.new("RGB", (8, 8), "red")
    first, second = files.save("view", picture), files.save("view", picture)
    assert first != second and Image.open(first).size == (8, 8)
    os.utime(first, (time.time() - 120,) * 2)
    drawn = files.save("attention", draw=lambda path: picture.save(path))
    assert not Path(first).exists() and Path(second).exists() and Path(drawn).name.startswith("attention-")


def odd_uploads(folder: Path) -> dict[str, Path]:
    """The uploads a public page gets: not a picture, empty, tiny, huge, animated, CMYK."""
    files = {
        "text": folder / "notes.txt",
        "empty": folder / "empty.png",
        "one pixel": folder / "dot.png",
        "8000 x 6000": folder / "huge.jpg",
        "animated GIF": folder / "moving.gif",
        "CMYK JPEG": folder / "cmyk.jpg",
    }
    files["text"].write_text("not a picture")
    files["empty"].write_bytes(b"")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(files["one pixel"])
    Image.new("RGB", (8000, 6000), (30, 120, 200)).save(files["8000 x 6000"], quality=70)
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(files["animated GIF"], save_all=True, append_images=frames[1:], duration=100, loop=0)
    Image.new("CMYK", (64, 48), (0, 200, 200, 0)).save(files["CMYK JPEG"])
    return files


def test_bad_uploads_and_prompts_get_a_message_or_a_caption_and_the_page_lives_on(served, pictures, tmp_path):
    client = Client(served, verbose=False)
    outcomes = {}
    for kind, path in odd_uploads(tmp_path).items():
        try:
            outcomes[kind] = client.predict(handle_file(str(path)), 1, "beam search", 8, "", api_name="/caption")[0]
        except AppError as error:
            outcomes[kind] = f"error: {error}"
    assert outcomes["text"].startswith("error: ") and "picture" in outcomes["text"]
    assert outcomes["empty"].startswith("error: ") and "empty" in outcomes["empty"]
    for kind in ("one pixel", "8000 x 6000", "animated GIF", "CMYK JPEG"):
        assert outcomes[kind] and not outcomes[kind].startswith("error"), (kind, outcomes[kind])
    with pytest.raises(AppError, match="vocabulary: 'zebra'"):
        client.predict(handle_file(str(pictures[0])), 1, "beam search", 8, "a zebra", api_name="/caption")
    assert client.predict(handle_file(str(pictures[0])), 1, "sampling", 8, "", api_name="/caption")[0]


def test_twenty_concurrent_requests_all_answer_and_memory_stays_flat(served, pictures):
    def one(index: int) -> str:
        client = Client(served, verbose=False)
        return client.predict(handle_file(str(pictures[index % 3])), 2, "beam search", 10, "", api_name="/caption")[0]

    with ThreadPoolExecutor(max_workers=20) as pool:
        assert all(pool.map(one, range(20)))
    client = Client(served, verbose=False)
    peaks = []
    for _ in range(4):
        for i in range(50):
            client.predict(handle_file(str(pictures[i % 3])), 1, "beam search", 8, "", api_name="/caption")
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # kB; the server runs in this process
    assert peaks[-1] - peaks[1] < 50_000, peaks  # 100 more requests after the first 100: under 50 MB more


def test_the_staged_space_runs_without_this_package(trained_tiny_model, saved, pictures, tmp_path):
    result = subprocess.run(
        [HF_CAPTIONER, "publish", "--space", "me/tiny-explorer", "--repo_id", "me/tiny", "--dry_run", "space"],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    space = tmp_path / "space"
    assert {p.name for p in space.iterdir()} == {
        "app.py",
        "captioner_app.py",
        "visualize.py",
        "requirements.txt",
        "README.md",
    }
    readme = (space / "README.md").read_text()
    assert "sdk: gradio" in readme and f"sdk_version: {gradio.__version__}" in readme and "- me/tiny" in readme
    assert f"gradio=={gradio.__version__}" in (space / "requirements.txt").read_text().split()
    port = free_port()
    blocker = "import sys, runpy; sys.modules['hf_captioner'] = None; sys.path.insert(0, '.'); runpy.run_path('app.py')"
    env = {**ENV, "CAPTIONER_MODEL": str(trained_tiny_model), "PORT": str(port), "PYTHONPATH": ""}
    process = subprocess.Popen(
        [sys.executable, "-c", blocker], cwd=space, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        client = None
        for _ in range(120):
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:
                assert process.poll() is None, process.stdout.read()[-3000:]
                time.sleep(1)
        assert client is not None
        caption = client.predict(handle_file(str(pictures[2])), 3, "beam search", 30, "", api_name="/caption")[0]
        assert caption == generated(saved, pictures[2], num_beams=3, max_new_tokens=30)
    finally:
        process.kill()


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on this machine (apt-get install chromium)")
def test_a_real_browser_captions_a_picture_and_shows_another_words_attention(served, saved, pictures, tmp_path):
    from hf_captioner.app import screenshot_page

    seen = screenshot_page(served, pictures[0], tmp_path / "app.png", executable_path=CHROMIUM)
    assert seen["caption"] == generated(saved, pictures[0], num_beams=3, max_new_tokens=30)
    assert seen["view_changed"] and Image.open(seen["screenshot"]).size[0] >= 1280
