"""The README and docs stay true: every relative link and image resolves, and every Python and shell block runs
(against the tiny trained model standing where the docs' commands put one), except a block marked as needing what a
test cannot have (real data, minutes of benchmarks). The dated study pages under docs/experiments record what was
run on real data: their links are checked, their commands are not run."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_snippets

from hf_captioner.data import make_sample_dataset

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").rglob("*.md"))]
RUN = [doc for doc in DOCS if "experiments" not in doc.parts]
NOT_RUN = "<!-- not run by the docs test"
ENV = {
    **os.environ,
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
}


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", markdown, flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def blocks(markdown: str, language: str) -> list[tuple[str, bool]]:
    """(code, runnable) of each fenced block in `language`; not runnable when the line above carries the mark."""
    found = []
    for match in re.finditer(rf"```{language}\n(.*?)```", markdown, flags=re.S):
        above = markdown[: match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        found.append((match.group(1), not above.startswith(NOT_RUN)))
    return found


def test_every_relative_link_and_image_in_the_docs_resolves():
    broken = []
    for doc in DOCS:
        text = doc.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://", "mailto:")):
                continue
            file, _, anchor = target.partition("#")
            path = (doc.parent / file).resolve() if file else doc
            if not path.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such file)")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path.read_text()):
                broken.append(f"{doc.relative_to(REPO)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


@pytest.fixture(scope="module")
def workdir(trained_tiny_model, tmp_path_factory) -> Path:
    """A folder laid out as the docs' commands expect: a trained model at runs/sample/final (a copy: commands write
    into it) and a photo.png."""
    root = tmp_path_factory.mktemp("docs")
    shutil.copytree(trained_tiny_model, root / "runs" / "sample" / "final")
    make_sample_dataset(0, 0, 1, seed=3, image_size=32)["test"][0]["image"].save(root / "photo.png")
    return root


@pytest.mark.parametrize("doc", RUN, ids=lambda doc: str(doc.relative_to(REPO)))
def test_every_python_and_shell_block_of_the_docs_runs(doc, workdir):
    text = doc.read_text()
    runnable = [(language, code) for language in ("python", "bash") for code, run in blocks(text, language) if run]
    assert len(python_snippets(text)) == len(blocks(text, "python"))  # every Python block is seen
    for language, code in runnable:
        command = [sys.executable, "-c", code] if language == "python" else ["bash", "-e", "-c", code]
        result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=ENV, timeout=600)
        assert result.returncode == 0, f"{doc.name}:\n{code}\n{result.stderr[-3000:]}"
