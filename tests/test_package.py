"""The package as users get it: a wheel installed into a fresh virtual environment and run outside this checkout."""

import json
import os
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import tiny_arguments

from hf_captioner.commands import COMMANDS
from hf_captioner.data import make_sample_dataset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> Path:
    """A venv holding only the built wheel; the dependencies come from this environment's site-packages (offline)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so building leaves nothing in the checkout
    shutil.copytree(REPO / "hf_captioner", source / "hf_captioner", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run(
        [
            *pip,
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(root / "dist"),
            str(source),
        ],
        check=True,
        timeout=300,
    )
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run(
        [*pip, "--python", str(python), "install", "--no-deps", "--no-index", *map(str, (root / "dist").glob("*.whl"))],
        check=True,
        timeout=300,
    )
    # a plain path line: the dependencies become importable, this environment's editable hook (a .pth) does not run
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(purelib) / "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    return venv


def run(venv: Path, cwd: Path, *command: str) -> str:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PATH=f"{venv / 'bin'}{os.pathsep}{env['PATH']}")
    result = subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=env, timeout=600)
    assert result.returncode == 0, f"{command}:\n{result.stderr[-3000:]}"
    return result.stdout


# runs `--help` of every command in one Python; each prints its usage
EVERY_HELP = (
    "from hf_captioner.commands import COMMANDS, main\nfor name in COMMANDS:\n    try:\n"
    "        main([name, '--help'])\n    except SystemExit as stop:\n        assert not stop.code, name\n"
)


def fresh_python(code: str) -> str:
    """`code` run by this environment's Python in a new process; its output (a failure shows its traceback)."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_help_of_every_command_and_importing_the_package_load_no_torch():
    """What makes `--help` quick (about 1.5 s here, against 7 s when it imported torch): no command builds its parser
    from anything that imports torch, and `import hf_captioner` imports none of its classes until one is used."""
    heavy = "import sys\nheavy = [m for m in ('torch', 'torchvision', 'datasets', 'timm') if m in sys.modules]\n"
    printed = fresh_python("import hf_captioner\n" + EVERY_HELP + heavy + "assert not heavy, heavy\n")
    assert printed.count("usage: hf-captioner") == len(COMMANDS)


def test_using_a_class_registers_them_all_with_the_auto_factories():
    fresh_python(
        "from transformers import AutoConfig, AutoModel\n"
        "from transformers.models.auto.processing_auto import PROCESSOR_MAPPING\n"
        "from hf_captioner import CaptionerConfig, CaptionerForConditionalGeneration, CaptionerProcessor\n"
        "assert type(AutoConfig.for_model(CaptionerConfig.model_type)) is CaptionerConfig\n"
        "assert AutoModel._model_mapping[CaptionerConfig] is CaptionerForConditionalGeneration\n"
        "assert PROCESSOR_MAPPING[CaptionerConfig] is CaptionerProcessor\n"
    )


@pytest.mark.slow
def test_the_installed_wheel_runs_every_command_outside_the_checkout(wheel_venv, tmp_path):
    where = run(wheel_venv, tmp_path, "python", "-c", "import hf_captioner; print(hf_captioner.__file__)")
    assert Path(where.strip()).is_relative_to(wheel_venv)
    assert all(name in run(wheel_venv, tmp_path, "hf-captioner", "--help") for name in COMMANDS)
    assert run(wheel_venv, tmp_path, "python", "-c", EVERY_HELP).count("usage: hf-captioner") == len(COMMANDS)

    config = tmp_path / "tiny.yaml"
    args = tiny_arguments(tmp_path / "run", num_epochs=1, sample_sizes=[32, 8, 4])
    config.write_text(yaml.safe_dump(vars(args)))
    run(wheel_venv, tmp_path, "hf-captioner", "train", "--config", str(config))
    model = tmp_path / "run" / "final"
    run(
        wheel_venv,
        tmp_path,
        "hf-captioner",
        "evaluate",
        "--model",
        str(model),
        "--split",
        "test",
        "--num_beams",
        "2",
        "--no_meteor",
        "--output_dir",
        str(tmp_path / "eval"),
    )
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["images"] == 4
    picture = tmp_path / "picture.png"
    make_sample_dataset(0, 0, 1, seed=1, image_size=32)["test"][0]["image"].save(picture)
    captioned = run(wheel_venv, tmp_path, "hf-captioner", "caption", "--model", str(model), str(picture))
    assert captioned.startswith(f"{picture}\t")
    run(
        wheel_venv,
        tmp_path,
        "hf-captioner",
        "publish",
        "--model",
        str(model),
        "--repo_id",
        "me/tiny",
        "--dry_run",
        str(tmp_path / "stage"),
    )
    card = (tmp_path / "stage" / "README.md").read_text()  # the template shipped inside the wheel
    assert "me/tiny" in card and "## How to use" in card
