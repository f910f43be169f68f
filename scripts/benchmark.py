"""Speed and memory of training and captioning on this machine: `python scripts/benchmark.py [--quick] [--out F]`.

Cases (Show, Attend and Tell sizes: 2048-d regions on a 14 x 14 grid, embedding/attention/hidden 512, 10,000 words,
captions of Flickr-like lengths):
- training step (forward + backward + AdamW) of the decoder on cached region features, batch 32;
- the same end to end through a ResNet-101-shaped encoder, frozen, and with its last two stages fine-tuned;
- caption generation, greedy and 3 / 5 beams, one image at a time and in batches, encoder included and excluded;
- the machine's own fp32 matrix-multiply rate, measured in the same run, and how much of it the training step uses.
Each case reports its peak resident memory above the process's baseline. `--quick` shrinks repetitions and batch
sizes so the whole run takes about a minute; its figures are rougher.
"""

from __future__ import annotations

import argparse
import json
import platform
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers.modeling_outputs import BaseModelOutput

from hf_captioner import CaptionerConfig, CaptionerForConditionalGeneration

VOCAB, GRID, REGION_DIM, WIDTH = 10_000, 14, 2048, 512


class PeakMemory:
    """Peak resident memory (MiB) above the level at entry, sampled every few milliseconds."""

    def __enter__(self):
        self.process = psutil.Process()
        self.baseline = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = (self.peak - self.baseline) / 2**20


def timed(function, repeats: int, warmup: int = 1) -> float:
    """Median seconds of `function()` over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def matmul_gflops(size: int, repeats: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    seconds = timed(lambda: a @ b, repeats)
    return 2 * size**3 / seconds / 1e9


def caption_lengths(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Flickr8k-like caption lengths in tokens (mean about 12 words, 5..30), plus </s>."""
    return (torch.randn(batch, generator=generator) * 3.5 + 12).round().clamp(5, 30).long() + 1


def make_labels(batch: int, generator: torch.Generator) -> torch.Tensor:
    lengths = caption_lengths(batch, generator)
    labels = torch.randint(4, VOCAB, (batch, int(lengths.max())), generator=generator)
    labels[torch.arange(labels.shape[1])[None] >= lengths[:, None]] = -100
    labels[torch.arange(batch), lengths - 1] = 2
    return labels


def sat_model(trainable_stages: int = 0) -> CaptionerForConditionalGeneration:
    config = CaptionerConfig(vocab_size=VOCAB, grid_size=GRID, embed_dim=WIDTH, hidden_size=WIDTH, attention_dim=WIDTH,
                             encoder_trainable_stages=trainable_stages, dropout=0.5)  # fmt: skip
    torch.manual_seed(0)
    return CaptionerForConditionalGeneration(config)


def decoder_flops_per_step(config: CaptionerConfig, region_dim: int) -> float:
    """Multiply-adds x 2 of one decoder step for one caption (forward only; backward is about twice that)."""
    e, h, a, k, v = config.embed_dim, config.hidden_size, config.attention_dim, config.grid_size**2, config.vocab_size
    cell_input = e + region_dim + (h if config.self_attention else 0)
    gates = 4 if config.rnn_type == "lstm" else 3
    macs = gates * h * (cell_input + h)  # recurrent cell
    macs += h * a + k * a + k * region_dim + h * region_dim  # query, scores (tanh . v), context, beta gate
    if config.self_attention:
        macs += (e + h) * h + 2 * h * h + h * h + 2 * 20 * h  # query, key/value of the new state, out, ~20 states
    macs += h * e + region_dim * e + e * v  # deep output and vocabulary projection
    return 2.0 * macs


def train_case(model, batch: int, repeats: int, inputs: str, generator: torch.Generator) -> dict:
    labels = make_labels(batch, generator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    if inputs == "features":
        batch_inputs = {"encoder_outputs": torch.randn(batch, GRID * GRID, REGION_DIM, generator=generator)}
    else:
        batch_inputs = {"pixel_values": torch.randn(batch, 3, 224, 224, generator=generator)}

    def step():
        loss = model(**batch_inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory() as memory:
        seconds = timed(step, repeats)
    tokens = int((labels != -100).sum())
    return {"batch": batch, "ms_per_step": 1e3 * seconds, "captions_per_s": batch / seconds,
            "tokens_per_step": tokens, "peak_mib": memory.mib}  # fmt: skip


@torch.no_grad()
def generate_case(model, batch: int, beams: int, repeats: int, with_encoder: bool, generator: torch.Generator) -> dict:
    model.eval()
    new_tokens = 13  # a Flickr-length caption; min = max so every case decodes the same number of steps
    pixel_values = torch.randn(batch, 3, 224, 224, generator=generator)
    regions = torch.randn(batch, GRID * GRID, REGION_DIM, generator=generator)

    def run():
        # a new BaseModelOutput each call: generate() expands the one it is given in place, once per call
        inputs = {"pixel_values": pixel_values} if with_encoder else {"encoder_outputs": BaseModelOutput(regions)}
        model.generate(**inputs, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    with PeakMemory() as memory:
        seconds = timed(run, repeats)
    return {"batch": batch, "beams": beams, "encoder": with_encoder, "images_per_s": batch / seconds,
            "ms_per_image": 1e3 * seconds / batch, "peak_mib": memory.mib}  # fmt: skip


def run(quick: bool) -> dict:
    generator = torch.Generator().manual_seed(0)
    repeats = 2 if quick else 5
    report = {
        "mode": "quick" if quick else "full",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },  # fmt: skip
        "matmul_gflops": matmul_gflops(1024 if quick else 2048, repeats * 2),
    }
    model = sat_model()
    flops = decoder_flops_per_step(model.config, REGION_DIM)
    train_batch = 32
    cached = train_case(model, train_batch, repeats, "features", generator)
    # forward + backward is about 3x the forward FLOPs; steps are caption tokens
    cached["gflops"] = 3 * flops * cached["tokens_per_step"] / (cached["ms_per_step"] / 1e3) / 1e9
    cached["fraction_of_matmul_rate"] = cached["gflops"] / report["matmul_gflops"]
    report["decoder_gflop_per_token"] = flops / 1e9
    end_to_end_batch = 4 if quick else train_batch
    report["training"] = {
        "cached_features": cached,
        "frozen_encoder": train_case(model, end_to_end_batch, 1 if quick else repeats, "images", generator),
        "fine_tuned_encoder": train_case(sat_model(2), end_to_end_batch, 1 if quick else repeats, "images", generator),
    }
    batches = [1, 8] if quick else [1, 32, 64]
    cases = []
    for beams in (1, 3) if quick else (1, 3, 5):
        for batch in batches:
            for with_encoder in (False,) if quick else (False, True):
                cases.append(generate_case(model, batch, beams, 1 if quick else 3, with_encoder, generator))
    report["generation"] = cases
    three_beams = {c["batch"]: c for c in cases if c["beams"] == 3 and not c["encoder"]}
    largest = max(three_beams)
    report["ratios"] = {
        f"beam3_batch{largest}_vs_batch1_images_per_s": three_beams[largest]["images_per_s"] / three_beams[1]["images_per_s"],
        "cached_vs_frozen_end_to_end_per_caption": cached["captions_per_s"] / report["training"]["frozen_encoder"]["captions_per_s"],
        "training_fraction_of_matmul_rate": cached["fraction_of_matmul_rate"],
    }  # fmt: skip
    return report


def table(report: dict) -> str:
    lines = [f"matrix multiply: {report['matmul_gflops']:.0f} GFLOP/s ({report['machine']['threads']} threads); "
             f"decoder: {report['decoder_gflop_per_token'] * 1e3:.1f} MFLOP per token (forward)", "",
             "| training (batch) | ms/step | captions/s | peak MiB |", "|---|---|---|---|"]  # fmt: skip
    for name, case in report["training"].items():
        lines.append(f"| {name} ({case['batch']}) | {case['ms_per_step']:.0f} | {case['captions_per_s']:.1f} | "
                     f"{case['peak_mib']:.0f} |")  # fmt: skip
    lines += ["", "| generation | batch | images/s | ms/image | peak MiB |", "|---|---|---|---|---|"]
    for case in report["generation"]:
        label = f"{'greedy' if case['beams'] == 1 else str(case['beams']) + ' beams'}, encoder {'in' if case['encoder'] else 'out'}"
        lines.append(f"| {label} | {case['batch']} | {case['images_per_s']:.1f} | {case['ms_per_image']:.1f} | "
                     f"{case['peak_mib']:.0f} |")  # fmt: skip
    lines += ["", *(f"{name}: {value:.2f}" for name, value in report["ratios"].items())]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about a minute, rougher figures")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON report")
    args = parser.parse_args()
    report = run(args.quick)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nReport: {args.out}")


if __name__ == "__main__":
    main()
