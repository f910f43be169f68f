"""The benchmark's quick mode runs end to end and reports every figure (its values are measurements, not tested)."""

import json
import os
import subprocess

import pytest
import torch
from conftest import HF_CAPTIONER, tiny_model
from transformers.modeling_outputs import BaseModelOutput

from hf_captioner.benchmarking import minimal_generate


def test_quick_benchmark_reports_every_case(tmp_path):
    out = tmp_path / "report.json"
    result = subprocess.run(
        [HF_CAPTIONER, "benchmark", "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["mode"] == "quick" and report["decoder_gflop_per_token"] > 0
    assert report["matmul_gflops"]["float32"] > 0 and report["matmul_gflops"]["bfloat16"] > 0
    assert report["decoder_gflop_per_caption_start"] > 0 and report["variants"] == []  # options: full mode only
    bf16 = report["machine"]["bf16_matrix_instructions"]  # the bf16 cases run only where the CPU has bf16 instructions
    expected = {
        "cached_features",
        "frozen_encoder",
        "fine_tuned_encoder",
        "lite0_cached_regions",
        "lite0_14x14_cached_regions",
        "lite0_top_stage_from_cached_bottom",
        "lite0_top_stage_from_images",
        "lite0_top_stage_from_cached_bottom_5_captions_per_image",
    }
    expected |= {"cached_features_bf16"} if bf16 else set()
    assert set(report["training"]) == expected
    for case in report["training"].values():
        assert {"batch", "ms_per_step", "captions_per_s", "peak_mib"} <= set(case) and case["captions_per_s"] > 0
    assert 0 < report["training"]["cached_features"]["fraction_of_matmul_rate"]
    beams = {(c["beams"], c["batch"]) for c in report["generation"]}
    assert {(1, 1), (3, 1), (1, 8), (3, 8)} <= beams
    assert all(c["images_per_s"] > 0 and c["peak_mib"] > 0 for c in report["generation"])  # each in its own process
    assert {c["variant"] for c in report["generation"]} == ({"", "bf16"} if bf16 else {""})
    caching = {(c["network"], c["precision"]) for c in report["feature_caching"]}
    precisions = {"float32", "bf16"} if bf16 else {"float32"}
    assert caching == {(n, p) for n in ("tf_efficientnet_lite0", "tf_efficientnet_lite2") for p in precisions}
    assert all(c["images_per_s"] > 0 for c in report["feature_caching"])
    assert set(report["ratios"]) >= {
        "beam3_batch8_vs_batch1_images_per_s",
        "cached_vs_frozen_end_to_end_per_caption",
        "training_fraction_of_matmul_rate",
    }
    assert "| training (batch) |" in result.stdout and "| feature caching (channels_last) |" in result.stdout


def test_scale_benchmark_runs_the_real_commands_and_cleans_up(tmp_path):
    """A tiny run of `benchmark-scale`: every figure present, the store measured, nothing left on disk."""
    out, work = tmp_path / "scale.json", tmp_path / "work"
    command = [
        HF_CAPTIONER,
        "benchmark-scale",
        "--sizes",
        "48",
        "--channels",
        "64",
        "--steps",
        "4",
        "--batch_size",
        "8",
        "--work_dir",
        str(work),
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["images"] == 48
    assert row["store_gb"] * 1e9 >= 48 * 14 * 14 * 64 * 4  # float32 features of every image, on disk
    for name in (
        "caching_peak_mb",
        "training_1p_peak_mb",
        "training_2p_peak_mb",
        "training_1p_captions_per_s",
        "training_2p_captions_per_s",
        "caching_mb_per_s",
    ):
        assert row[name] > 0
    assert not work.exists()
    assert "| 48 |" in result.stdout


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_minimal_generation_loop_writes_what_generate_writes(num_beams):
    """The benchmark's measure of transformers' loop is only fair if the minimal loop does the same search (these
    settings reorder the beams: the loop without its cache reordering fails here)."""
    model = tiny_model(seed=2).eval()
    regions = torch.randn(4, 16, model.encoder.num_channels, generator=torch.Generator().manual_seed(2)) * 3
    expected = model.generate(
        encoder_outputs=BaseModelOutput(regions), num_beams=num_beams, max_new_tokens=12, min_new_tokens=12
    )
    assert torch.equal(minimal_generate(model, BaseModelOutput(regions), num_beams, 12), expected)
