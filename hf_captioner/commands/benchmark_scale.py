"""Memory and speed against data set size: `hf-captioner benchmark-scale [--sizes 2500 10000 40000] [--out F]`.

Per size N: a synthetic data set of N small drawn pictures, a cheap stand-in encoder with the real output shapes
(a one-stage ResNet whose grid is pooled to 14 x 14 with 1280 or 2048 channels, so the run measures the feature store
and the training loop rather than a CNN) and a decoder at Show-Attend-Tell sizes. The real `hf-captioner train`
runs, each in its own process(es): one caches the features (and takes one step), then 200 steps on random batches
over the whole set with one process and with two (`accelerate launch`). Printed per N: each process's peak own
memory (`RssAnon`: pages of the memory-mapped store, which the kernel can drop, do not count) while caching and while
training, the store's size on disk, caching MB/s, and training captions/s (median over the logged intervals after
the first). Stores and data are deleted when done.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import yaml

from hf_captioner.cli import CommandParser, configure_logging, positive_int

ACCELERATE_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "accelerate" / "cpu_2_processes.yaml"
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) INFO [\w.]+: (.*)$")


def run_config(
    data: Path, cache: Path, output_dir: Path, channels: int, dtype: str, steps: int, batch: int, workers: int = 0
) -> dict:
    """A training config: the stand-in encoder (frozen, features cached) and a Show-Attend-Tell-sized decoder."""
    return {
        "data": str(data),
        "image_size": 16,
        "resize_size": 16,
        "tokenizer_model_type": "word",
        "vocab_size": 100,
        "model": {
            "vision_config": {
                "model_type": "resnet",
                "layer_type": "bottleneck",
                "embedding_size": 16,
                "depths": [1],
                "hidden_sizes": [channels],
                "downsample_in_first_stage": False,
            },
            "grid_size": 14,
            "encoder_trainable_stages": 0,
            "embed_dim": 512,
            "hidden_size": 512,
            "attention_dim": 512,
        },
        "cache_features": True,
        "feature_cache_dir": str(cache),
        "feature_cache_dtype": dtype,
        "batch_size": batch,
        "num_workers": workers,
        "eval_batch_size": 64,
        "eval_max_new_tokens": 12,
        "max_train_steps": steps,
        "num_epochs": 1000,  # max_train_steps ends the run
        "log_every_steps": max(1, steps // 10),
        "report_to": "none",
        "output_dir": str(output_dir),
        "overwrite_output_dir": True,
    }


def own_memory_mb(pid: int) -> float | None:
    """A process's resident anonymous memory (MB), or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def descendants(pid: int) -> list[int]:
    children = []
    for path in Path("/proc").glob(f"{pid}/task/*/children"):
        for child in path.read_text().split():
            children += [int(child), *descendants(int(child))]
    return children


def run_and_watch(command: list[str], env: dict) -> tuple[dict[int, float], list[str]]:
    """Run a command; return the peak own memory of it and of each process it starts (sampled every 50 ms, MB) and
    its log lines. Fails with the command's last output if it fails."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines, peaks = [], {}
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    while process.poll() is None:
        for pid in [process.pid, *descendants(process.pid)]:
            memory = own_memory_mb(pid)
            if memory is not None:
                peaks[pid] = max(peaks.get(pid, 0.0), memory)
        time.sleep(0.05)
    reader.join()
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{''.join(lines[-40:])}")
    return peaks, lines


def logged_at(lines: list[str], text: str) -> datetime:
    for line in lines:
        match = LOG_TIME.match(line.strip().split("\r")[-1])
        if match and match.group(2).startswith(text):
            return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
    raise RuntimeError(f"no log line starting {text!r}")


def training_peak(peaks: dict[int, float], launcher: bool) -> float:
    """The largest peak among the training processes (not the `accelerate launch` parent, which trains nothing)."""
    workers = list(peaks.values())[1:] if launcher else list(peaks.values())[:1]
    return max(workers)


def measure_size(size: int, work: Path, channels: int, dtype: str, steps: int, batch: int, workers: int) -> dict:
    from hf_captioner.data import write_sample_dataset
    from hf_captioner.data.feature_store import FeatureStore

    data, cache = work / f"data-{size}", work / "features"
    write_sample_dataset(data, size, 64, 0, seed=0, image_size=16)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    config = work / "run.yaml"
    train = [sys.executable, "-m", "hf_captioner.commands.train", "--config", str(config)]
    result = {"images": size}

    config.write_text(yaml.safe_dump(run_config(data, cache, work / "run", channels, dtype, 1, batch)))
    peaks, lines = run_and_watch(train, env)
    store = next(folder for folder in cache.iterdir() if len(FeatureStore(folder)) == size)  # not validation's
    result["store_gb"] = sum(path.stat().st_size for path in store.iterdir()) / 1e9
    seconds = (logged_at(lines, "Cached encoder features of") - logged_at(lines, "Model:")).total_seconds()
    result["caching_mb_per_s"] = result["store_gb"] * 1000 / seconds
    result["caching_images_per_s"] = size / seconds
    result["caching_peak_mb"] = training_peak(peaks, launcher=False)

    for processes in (1, 2):
        config.write_text(yaml.safe_dump(run_config(data, cache, work / "run", channels, dtype, steps, batch, workers)))
        if processes == 1:
            command = train
        else:
            env["OMP_NUM_THREADS"] = "1"
            command = [
                sys.executable,
                "-m",
                "accelerate.commands.launch",
                "--config_file",
                str(ACCELERATE_CONFIG),
                "--main_process_port",
                "0",
                *train[1:],
            ]
        peaks, lines = run_and_watch(command, env)
        log = json.loads((work / "run" / "metrics.json").read_text())["log_history"]
        rates = [entry["train/examples_per_second"] for entry in log][1:] or [log[0]["train/examples_per_second"]]
        result[f"training_{processes}p_peak_mb"] = training_peak(peaks, launcher=processes > 1)
        result[f"training_{processes}p_captions_per_s"] = statistics.median(rates)
    shutil.rmtree(cache)
    shutil.rmtree(data)
    return result


def table(rows: list[dict], channels: int, dtype: str, workers: int) -> str:
    lines = [
        f"Feature store at 14 x 14 x {channels}, {dtype}; own memory = peak RssAnon of a process (MB); "
        f"{workers} DataLoader worker(s) per process",
        "| images | store GB | caching MB/s | caching img/s | caching memory | training memory 1p / 2p (each) "
        "| captions/s 1p / 2p |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['images']} | {r['store_gb']:.1f} | {r['caching_mb_per_s']:.0f} | {r['caching_images_per_s']:.0f} "
            f"| {r['caching_peak_mb']:.0f} | {r['training_1p_peak_mb']:.0f} / {r['training_2p_peak_mb']:.0f} "
            f"| {r['training_1p_captions_per_s']:.1f} / {r['training_2p_captions_per_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__.splitlines()[0], prog="hf-captioner benchmark-scale")
    parser.add_argument(
        "--sizes",
        type=positive_int,
        nargs="+",
        default=[2500, 10000, 40000],
        help="numbers of training images, one run each",
    )
    parser.add_argument("--channels", type=positive_int, default=1280, help="feature channels (1280 or 2048)")
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="how the store keeps features"
    )
    parser.add_argument("--steps", type=positive_int, default=200, help="training steps per run")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="captions per step and process")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers per training process")
    parser.add_argument("--work_dir", default="benchmark-scale", help="data, stores and runs (deleted when done)")
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args(argv)
    configure_logging()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        for size in args.sizes:
            rows.append(
                measure_size(size, work, args.channels, args.dtype, args.steps, args.batch_size, args.num_workers)
            )
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(rows, args.channels, args.dtype, args.num_workers))
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "channels": args.channels,
                    "dtype": args.dtype,
                    "steps": args.steps,
                    "num_workers": args.num_workers,
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
