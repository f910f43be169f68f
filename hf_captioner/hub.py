"""Publishing: stage a model folder for the Hub and prove it loads through `trust_remote_code` alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

from .model_card import FIGURES_DIR, attention_figures, check_model_card, write_model_card

# what travels with the weights besides save_pretrained's own files
RECORDS = ("training_args.json", "training_metrics.json")

REMOTE_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_captioner"] = None  # the package must not be importable: only the folder's own code may run
    try:
        import hf_captioner  # noqa: F401
        raise SystemExit("hf_captioner is importable")
    except ImportError:
        pass
    import torch
    import transformers
    from PIL import Image
    from transformers import AutoModel, AutoModelForImageTextToText, AutoProcessor, pipeline
    folder, images = sys.argv[1], sys.argv[2:]
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    pixel_values = processor(images=[Image.open(p) for p in images], return_tensors="pt")["pixel_values"]
    ids = model.generate(pixel_values=pixel_values)
    greedy = model.generate(pixel_values=pixel_values, num_beams=1, return_dict_in_generate=True)
    cache = greedy.get("cache") or greedy.get("past_key_values")  # its name from transformers 5.24 on / before
    uncached = model.generate(pixel_values=pixel_values, num_beams=1, use_cache=False)
    torch.manual_seed(0)
    sampled = model.generate(pixel_values=pixel_values, num_beams=1, do_sample=True)
    with torch.no_grad():
        logits = model(pixel_values=pixel_values, decoder_input_ids=ids).logits
    image_text = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    captioner = pipeline("image-text-to-text", model=folder, trust_remote_code=True)
    piped = captioner([Image.open(p) for p in images], text=[""] * len(images))
    print(json.dumps({"module": type(model).__module__, "transformers": transformers.__version__,
                      "image_text_ids": image_text.generate(pixel_values=pixel_values).tolist(),
                      "pipeline": [record["generated_text"] for record in piped],
                      "ids": ids.tolist(), "captions": processor.batch_decode(ids), "logits": logits.tolist(),
                      "greedy": greedy.sequences.tolist(), "greedy_cache": type(cache).__name__,
                      "uncached": uncached.tolist(), "sampled": sampled.tolist()}))
    """
)


def probe_images(folder: Path, count: int = 3, size: int = 96) -> list[Path]:
    """A few fixed pictures (seeded noise with a bright square) to compare captions on."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        pixels[size // 4 : size // 2, (i * size) // 4 : (i * size) // 4 + size // 4] = (230, 40, 40)
        paths.append(folder / f"probe-{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def load_without_package(
    folder: str | Path, images: list[Path], timeout: int = 600, transformers_dir: str | Path | None = None
) -> dict:
    """Load `folder` with trust_remote_code in a fresh Python that cannot import hf_captioner; caption `images` with
    the saved generation defaults. Returns the model's module, the transformers version, token ids (also through
    AutoModelForImageTextToText), captions (also through the image-text-to-text pipeline), the
    logits of the captions fed back (teacher forcing), greedy ids with and without the cache (and the type of the cache
    generate returned), and sampled ids (seed 0). `transformers_dir`, a
    folder holding another transformers release, goes first on the child's path: users load saved folders under
    their own version. Raises RuntimeError with the child's error output if it cannot."""
    folder = Path(folder).resolve()  # the child runs elsewhere: a relative name would be looked up on the Hub
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if transformers_dir is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(transformers_dir), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory() as scratch:
        env["HF_MODULES_CACHE"] = str(Path(scratch) / "modules")
        result = subprocess.run(
            [sys.executable, "-c", REMOTE_CHECK, str(folder), *map(str, images)],
            capture_output=True,
            text=True,
            env=env,
            cwd=scratch,
            timeout=timeout,
        )
    if result.returncode != 0:
        lines = result.stderr.strip().splitlines() or ["(no error output)"]
        raise RuntimeError(
            f"{folder} did not load and caption through trust_remote_code in a fresh Python without hf_captioner: "
            f"{lines[-1]}\n{result.stderr[-3000:]}"
        )
    return json.loads(result.stdout.strip().splitlines()[-1])


SPACE_APP = textwrap.dedent(
    """
    \"\"\"The attention explorer of {repo_id}: caption a picture and see, word by word, where the model looks.
    Staged by `hf-captioner publish --space`; CAPTIONER_MODEL may name another model (a Hub id or a folder).\"\"\"
    import os

    from captioner_app import launch

    launch(os.environ.get("CAPTIONER_MODEL", "{repo_id}"), port=int(os.environ.get("PORT", 7860)),
           title="{title}")
    """
).lstrip()

SPACE_README = textwrap.dedent(
    """
    ---
    title: {title}
    sdk: gradio
    sdk_version: {gradio}
    app_file: app.py
    models:
      - {repo_id}
    pinned: false
    ---

    # {title}

    Caption a picture with [{repo_id}](https://huggingface.co/{repo_id}) and choose a word to see where the model
    looked while writing it. The model's own code comes with it (`trust_remote_code`); this Space needs nothing else
    of hf-captioner.
    """
).lstrip()

# what the Space installs: the versions this package was tested with
SPACE_REQUIREMENTS = (
    "gradio",
    "transformers",
    "torch",
    "torchvision",
    "timm",
    "matplotlib",
    "pillow",
    "numpy",
    "safetensors",
    "sentencepiece",
)


def stage_space(repo_id: str, space_id: str, stage_dir: str | Path) -> Path:
    """A Space folder that serves the attention explorer for the Hub model `repo_id`: app.py, the explorer
    (captioner_app.py, visualize.py: copies of this package's, which import nothing else of it), requirements.txt
    with the tested versions, and a README whose YAML header the Hub reads (sdk gradio, its version, the model)."""
    from importlib.metadata import PackageNotFoundError, version

    stage_dir = Path(stage_dir)
    if stage_dir.exists() and any(stage_dir.iterdir()):
        raise FileExistsError(f"{stage_dir} is not empty; choose a new folder for the staged Space")
    stage_dir.mkdir(parents=True, exist_ok=True)
    package = Path(__file__).resolve().parent
    title = space_id.split("/")[-1]
    shutil.copy(package / "app.py", stage_dir / "captioner_app.py")
    shutil.copy(package / "visualize.py", stage_dir / "visualize.py")
    (stage_dir / "app.py").write_text(SPACE_APP.format(repo_id=repo_id, title=title))
    pins = []
    for name in SPACE_REQUIREMENTS:
        try:
            pins.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pins.append(name)
    (stage_dir / "requirements.txt").write_text("\n".join(pins) + "\n")
    gradio_version = version("gradio")
    (stage_dir / "README.md").write_text(SPACE_README.format(title=title, repo_id=repo_id, gradio=gradio_version))
    return stage_dir


def stage_for_hub(model_dir: str | Path, stage_dir: str | Path, repo_id: str) -> Path:
    """Write exactly what gets uploaded: weights, config, generation config, processor, code files, the records
    of training and evaluation, and the filled model card as README.md."""
    from .modeling_captioner import CaptionerForConditionalGeneration
    from .processing_captioner import CaptionerProcessor

    model_dir, stage_dir = Path(model_dir), Path(stage_dir)
    if stage_dir.exists() and any(stage_dir.iterdir()):
        raise FileExistsError(f"{stage_dir} is not empty; choose a new folder for the staged upload")
    model = CaptionerForConditionalGeneration.from_pretrained(model_dir)
    processor = CaptionerProcessor.from_pretrained(model_dir)
    model.save_pretrained(stage_dir)  # re-saving copies the code files and writes auto_map
    processor.save_pretrained(stage_dir)
    for name in RECORDS:
        if (model_dir / name).is_file():
            shutil.copy(model_dir / name, stage_dir / name)
    for evaluation in sorted(model_dir.glob("eval-*/metrics.json")):
        (stage_dir / evaluation.parent.name).mkdir()
        shutil.copy(evaluation, stage_dir / evaluation.parent.name / "metrics.json")
    figures = attention_figures(model_dir)[:1]  # the one the card shows
    for figure in figures:
        (stage_dir / FIGURES_DIR).mkdir(exist_ok=True)
        shutil.copy(figure, stage_dir / FIGURES_DIR / figure.name)
    check_model_card(write_model_card(stage_dir, repo_id))  # the Hub reads its metadata as huggingface_hub does
    return stage_dir
