"""Fault injection: kill a tiny training run at random moments and check that resuming always ends where the
uninterrupted run ends (same final weights, same validation history).

    python tests/fault_injection.py --kills 25 [--seed 0] [--workdir DIR]

Each trial starts a fresh run with `hf-captioner train`, kills its process group with SIGKILL at a random moment
of a reference run's duration, then resumes (`--resume_from_checkpoint latest`; a run killed before its first
checkpoint starts again with `--overwrite_output_dir true`) until it finishes, and compares `final/` and
`metrics.json` with the reference. Prints one line per trial and a summary; exits 1 if any trial differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from conftest import HF_CAPTIONER, tiny_arguments
from safetensors.torch import load_file

from hf_captioner.training import list_checkpoints

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_config(workdir: Path) -> Path:
    """A tiny run (about 15 optimizer steps a epoch, 3 epochs) that checkpoints every 2 steps."""
    args = tiny_arguments(
        workdir / "unused",
        sample_sizes=[32, 8, 4],
        num_epochs=3,
        checkpoint_every_steps=2,
        keep_checkpoints=2,
        early_stopping_patience=0,
    )
    values = {k: v for k, v in vars(args).items() if k != "output_dir"}
    config = workdir / "tiny.yaml"
    config.write_text(yaml.safe_dump(values))
    return config


def train(config: Path, output_dir: Path, *extra: str) -> subprocess.Popen:
    """`hf-captioner train` in its own process group; its output goes to `<output_dir>.log`."""
    command = [HF_CAPTIONER, "train", "--config", str(config), "--output_dir", str(output_dir), *extra]
    with open(output_dir.with_name(output_dir.name + ".log"), "a") as log:
        return subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def failed(output_dir: Path, what: str) -> str:
    return f"{what} failed:\n" + output_dir.with_name(output_dir.name + ".log").read_text()[-3000:]


def finish(config: Path, output_dir: Path) -> str:
    """Resume (or restart, when no checkpoint was written) until the run completes; returns how it went on."""
    how = "resumed" if list_checkpoints(output_dir) else "restarted"
    extra = ["--resume_from_checkpoint", "latest"] if how == "resumed" else ["--overwrite_output_dir", "true"]
    if train(config, output_dir, *extra).wait(timeout=900) != 0:
        raise RuntimeError(failed(output_dir, f"the {how} run"))
    return how


def compare(reference: Path, run: Path) -> tuple[float, bool]:
    """Largest weight difference of final/ and whether the validation histories agree."""
    expected, got = (load_file(folder / "final" / "model.safetensors") for folder in (reference, run))
    difference = (
        max((expected[k] - got[k]).abs().max().item() for k in expected)
        if expected.keys() == got.keys()
        else float("inf")
    )
    histories = [json.loads((folder / "metrics.json").read_text())["history"] for folder in (reference, run)]
    same = [(h["step"], round(h["val_loss"], 5), round(h["cider"], 5)) for h in histories[0]] == [
        (h["step"], round(h["val_loss"], 5), round(h["cider"], 5)) for h in histories[1]
    ]
    return difference, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder")
    options = parser.parse_args()
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="fault-injection-"))
    workdir.mkdir(parents=True, exist_ok=True)
    config = write_config(workdir)
    rng = random.Random(options.seed)

    started = time.perf_counter()
    reference = workdir / "reference"
    process = train(config, reference, "--overwrite_output_dir", "true")
    begins = None  # when the run starts writing (before that, a kill only costs the imports)
    while process.poll() is None:
        if begins is None and (reference / "training_args.json").exists():
            begins = time.perf_counter() - started
        time.sleep(0.02)
    if process.returncode != 0:
        sys.exit(failed(reference, "the reference run"))
    duration = time.perf_counter() - started
    print(
        f"reference run: {duration:.1f} s, writing from {begins:.1f} s; each trial is killed at a random moment "
        "between the two"
    )

    failures, largest = 0, 0.0
    for trial in range(options.kills):
        output_dir = workdir / f"trial-{trial:02d}"
        moment = rng.uniform(begins, duration)
        process = train(config, output_dir, "--overwrite_output_dir", "true")
        try:
            process.wait(timeout=moment)
            killed = False  # it finished before the kill
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            killed = True
        checkpoints = [p.name for p in list_checkpoints(output_dir)]
        how = finish(config, output_dir) if killed else "finished before the kill"
        difference, same = compare(reference, output_dir)
        ok = same and difference <= 1e-5
        failures += not ok
        largest = max(largest, difference)
        print(
            f"trial {trial:2d}: killed at {moment:5.1f} s (last checkpoint: {checkpoints[-1] if checkpoints else '-'}), "
            f"{how}; max weight difference {difference:.2e}, history {'same' if same else 'DIFFERENT'}"
            f"{'' if ok else '  <-- FAILED'}",
            flush=True,
        )
    print(
        f"\n{options.kills - failures}/{options.kills} trials ended with the uninterrupted run's weights and "
        f"metrics; largest weight difference {largest:.2e}; {time.perf_counter() - started:.0f} s in all"
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
