"""Speed and memory measurements behind `hf-captioner benchmark` (its --help lists the cases)."""

from __future__ import annotations

import multiprocessing
import platform
import threading
import time
from pathlib import Path

import psutil
import torch
from transformers.modeling_outputs import BaseModelOutput

from .arguments import TrainingArguments
from .configuration_captioner import CaptionerConfig
from .inference import bf16_pays, cpu_multiplies_bf16_fast, speed_options
from .modeling_captioner import CACHE_NAME, CaptionerForConditionalGeneration
from .training import build_optimizer

VOCAB, GRID, REGION_DIM, WIDTH = 10_000, 14, 2048, 512
LITE0_VOCAB = 4000


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


def in_fresh_process(case: dict) -> dict:
    """Run one case in a forked child (the parent has computed nothing, so no thread pool is inherited)."""
    receiver, sender = multiprocessing.get_context("fork").Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_child, args=(case, sender))
    child.start()
    sender.close()
    result = receiver.recv()
    child.join()
    if "error" in result:
        raise RuntimeError(f"benchmark case {case} failed:\n{result['error']}")
    return result


def _child(case: dict, sender) -> None:
    try:
        sender.send(RUNNERS[case["kind"]](**{k: v for k, v in case.items() if k != "kind"}))
    except Exception:  # the parent reports it with the case that failed
        import traceback

        sender.send({"error": traceback.format_exc()})


def matmul_gflops(
    size: int, repeats: int, dtype: str = "float32", rows: int | None = None, inner: int | None = None
) -> dict:
    """The rate of a (rows x inner) @ (inner x size) product (square by default): a decoder step's shape is
    32 x 3072 x 2048 (a batch's [embedding, context, attended] times the cell's input weights)."""
    rows, inner = rows or size, inner or size
    a = torch.randn(rows, inner).to(getattr(torch, dtype))
    b = torch.randn(inner, size).to(getattr(torch, dtype))
    seconds = timed(lambda: a @ b, repeats)
    return {"gflops": 2 * rows * inner * size / seconds / 1e9, "threads": torch.get_num_threads(), "size": size}


def cpu_description() -> dict:
    """The CPU's model name and the instruction sets that decide bf16 (from /proc/cpuinfo where there is one)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    return {
        "model_name": name or platform.processor() or platform.machine(),
        "flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}),
    }


def caption_lengths(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Flickr8k-like caption lengths in tokens (mean about 12 words, 5..30), plus </s>."""
    return (torch.randn(batch, generator=generator) * 3.5 + 12).round().clamp(5, 30).long() + 1


def make_labels(batch: int, generator: torch.Generator, vocab: int = VOCAB) -> torch.Tensor:
    """Random captions, longest first (as `CaptionCollator` batches them)."""
    lengths = caption_lengths(batch, generator).sort(descending=True).values
    labels = torch.randint(4, vocab, (batch, int(lengths.max())), generator=generator)
    labels[torch.arange(labels.shape[1])[None] >= lengths[:, None]] = -100
    labels[torch.arange(batch), lengths - 1] = 2
    return labels


def sat_config(trainable_stages: int = 0) -> CaptionerConfig:
    return CaptionerConfig(
        vocab_size=VOCAB,
        grid_size=GRID,
        embed_dim=WIDTH,
        hidden_size=WIDTH,
        attention_dim=WIDTH,
        encoder_trainable_stages=trainable_stages,
        dropout=0.5,
    )


def sat_model(trainable_stages: int = 0) -> CaptionerForConditionalGeneration:
    torch.manual_seed(0)
    return CaptionerForConditionalGeneration(sat_config(trainable_stages))


def lite0_model(trainable_stages: int = 0, output_stride: int = 32) -> CaptionerForConditionalGeneration:
    """The model of configs/flickr8k_cpu.yaml: EfficientNet-Lite0 (7 x 7 x 1280 regions; 14 x 14 at output stride
    16) and 4,000 words."""
    torch.manual_seed(0)
    return CaptionerForConditionalGeneration(
        CaptionerConfig(
            vocab_size=LITE0_VOCAB,
            grid_size=224 // output_stride,
            vision_backbone="timm:tf_efficientnet_lite0",
            vision_output_stride=output_stride,
            embed_dim=WIDTH,
            hidden_size=WIDTH,
            attention_dim=WIDTH,
            encoder_trainable_stages=trainable_stages,
            dropout=0.5,
        )
    )


def decoder_flops(config: CaptionerConfig, region_dim: int) -> tuple[float, float]:
    """FLOPs (2 x multiply-adds, forward) of one decoder step for one caption, and of starting one caption (the
    region projection and the initial state, once per caption); backward is about twice the forward."""
    e, h, a, k, v = config.embed_dim, config.hidden_size, config.attention_dim, config.grid_size**2, config.vocab_size
    cell_input = e + region_dim + (h if config.self_attention else 0)
    gates = 4 if config.rnn_type == "lstm" else 3
    macs = gates * h * (cell_input + h)  # recurrent cell
    macs += h * a + k * a + k * region_dim + h * region_dim  # query, scores (tanh . v), context, beta gate
    if config.self_attention:
        macs += (e + h) * h + 2 * h * h + h * h + 2 * 20 * h  # query, key/value of the new state, out, ~20 states
    macs += h * e + region_dim * e + e * v  # deep output and vocabulary projection
    start_macs = k * region_dim * a + (2 if config.rnn_type == "lstm" else 1) * region_dim * h
    return 2.0 * macs, 2.0 * start_macs


def train_case(
    batch: int,
    repeats: int,
    inputs: str,
    trainable_stages: int = 0,
    variant: str = "",
    lite0: bool = False,
    captions_per_image: int = 1,
    output_stride: int = 32,
) -> dict:
    """One training step from `inputs`: "features" (cached regions), "images", or "bottom" (the cached output of the
    encoder's frozen bottom, its top stages fine-tuning); the SAT-sized model, or with `lite0` the Flickr8k CPU one
    (at `output_stride` 16: its 14 x 14 grid). With `captions_per_image` > 1 the batch's captions come that many per
    image (`group_captions_by_image`)."""
    generator = torch.Generator().manual_seed(0)
    model = (lite0_model(trainable_stages, output_stride) if lite0 else sat_model(trainable_stages)).train()
    labels = make_labels(batch, generator, model.config.vocab_size)
    optimizer = build_optimizer(model, TrainingArguments(learning_rate=1e-4))
    regions, channels = model.config.grid_size**2, model.encoder.num_channels
    images = -(-batch // captions_per_image)
    if inputs == "features":
        batch_inputs = {"encoder_outputs": torch.randn(images, regions, channels, generator=generator)}
    else:
        batch_inputs = {"pixel_values": torch.randn(images, 3, 224, 224, generator=generator)}
    if inputs == "bottom":
        batch_inputs = {"frozen_features": model.encoder.frozen_features(batch_inputs["pixel_values"])}
    if captions_per_image > 1:
        batch_inputs["image_index"] = torch.arange(batch) // captions_per_image
    autocast = speed_options(model, "bf16" in variant, "channels_last" in variant, "compile" in variant)

    def step():
        with autocast:
            loss = model(**batch_inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with PeakMemory() as memory:
        seconds = timed(step, repeats)
    tokens = int((labels != -100).sum())
    step_flops, start_flops = decoder_flops(model.config, channels)
    # backward ~ 2x forward: 3x in all for the steps; 2x for the start (the regions need no gradient)
    gflops = (3 * step_flops * tokens + 2 * start_flops * batch) / seconds / 1e9
    return {
        "batch": batch,
        "ms_per_step": 1e3 * seconds,
        "captions_per_s": batch / seconds,
        "tokens_per_step": tokens,
        "decoder_gflops": gflops,
        "peak_mib": memory.mib,
    }


@torch.no_grad()
def minimal_generate(model, encoder_outputs: BaseModelOutput, num_beams: int, new_tokens: int) -> torch.LongTensor:
    """Beam search (greedy at one beam) written out over the model's own cache: exactly `new_tokens` steps, the
    generation config's suppressed tokens and the end token banned, as `generate` decodes with min_new_tokens =
    max_new_tokens. What transformers' loop adds around the model is `generate`'s time minus this loop's (the
    benchmark's "minimal loop" cases); a test pins the two to the same captions."""
    images = encoder_outputs.last_hidden_state.shape[0]
    first_rows = torch.arange(images).unsqueeze(1) * num_beams  # (images, 1)
    tokens = torch.full((images * num_beams, 1), model.config.decoder_start_token_id)
    banned = [*(model.generation_config.suppress_tokens or []), model.config.eos_token_id]
    scores = torch.full((images, num_beams), -1e9)
    scores[:, 0] = 0  # the first step expands one beam per image: the others are copies of it
    outputs = model(encoder_outputs=encoder_outputs, decoder_input_ids=tokens, use_cache=True)
    for step in range(new_tokens):
        log_probs = outputs.logits[:, -1].float().log_softmax(dim=-1)
        log_probs[:, banned] = -float("inf")
        vocab = log_probs.shape[-1]
        candidates = (scores.view(-1, 1) + log_probs).view(images, -1)  # (images, beams * V)
        scores, chosen = candidates.topk(num_beams, dim=1)  # (images, beams)
        beams = (chosen // vocab + first_rows).view(-1)  # the row each new beam continues
        new = (chosen % vocab).view(-1, 1)
        tokens = torch.cat([tokens[beams], new], dim=1)
        if step + 1 < new_tokens:
            cache = outputs[CACHE_NAME]
            cache.reorder_cache(beams)
            outputs = model(decoder_input_ids=new, use_cache=True, **{CACHE_NAME: cache})
    return tokens[(scores.argmax(dim=1) + first_rows.squeeze(1))]


@torch.no_grad()
def generate_case(batch: int, beams: int, repeats: int, encoder: bool, variant: str = "") -> dict:
    generator = torch.Generator().manual_seed(0)
    model = sat_model().eval()
    new_tokens = 13  # a Flickr-length caption; min = max so every case decodes the same number of steps
    pixel_values = torch.randn(batch, 3, 224, 224, generator=generator)
    regions = torch.randn(batch, GRID * GRID, REGION_DIM, generator=generator)
    autocast = speed_options(model, "bf16" in variant, "channels_last" in variant, "compile" in variant)

    def run():
        inputs = {"pixel_values": pixel_values} if encoder else {"encoder_outputs": BaseModelOutput(regions)}
        with autocast:
            if "minimal_loop" in variant:
                minimal_generate(model, BaseModelOutput(regions), beams, new_tokens)
            else:
                model.generate(**inputs, num_beams=beams, max_new_tokens=new_tokens, min_new_tokens=new_tokens)

    with PeakMemory() as memory:
        seconds = timed(run, repeats)
    return {
        "batch": batch,
        "beams": beams,
        "encoder": encoder,
        "variant": variant,
        "images_per_s": batch / seconds,
        "ms_per_image": 1e3 * seconds / batch,
        "peak_mib": memory.mib,
    }


def probe_case() -> dict:
    return {"bf16_pays": bf16_pays("cpu")}


@torch.no_grad()
def encode_case(network: str, image_size: int, batch: int, repeats: int, precision: str = "float32") -> dict:
    """Feature caching's encoder pass: a frozen timm EfficientNet-Lite (random weights: the same arithmetic) on a batch
    of pictures in channels_last, in float32 or under bf16 autocast (`feature_cache_precision`)."""
    torch.manual_seed(0)
    config = CaptionerConfig(vocab_size=LITE0_VOCAB, grid_size=7, vision_backbone=f"timm:{network}")
    encoder = CaptionerForConditionalGeneration(config).encoder.eval().to(memory_format=torch.channels_last)
    images = torch.randn(batch, 3, image_size, image_size).contiguous(memory_format=torch.channels_last)

    def encode():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            encoder(images)

    seconds = timed(encode, repeats)
    return {"network": network, "image_size": image_size, "precision": precision, "images_per_s": batch / seconds}


RUNNERS = {
    "matmul": matmul_gflops,
    "train": train_case,
    "generate": generate_case,
    "probe": probe_case,
    "encode": encode_case,
}


def run(quick: bool) -> dict:
    repeats = 2 if quick else 5
    size = 1024 if quick else 2048
    fast_bf16 = cpu_multiplies_bf16_fast()
    matmul = in_fresh_process({"kind": "matmul", "size": size, "repeats": repeats * 2})
    # without bf16 instructions a 2048 product takes most of a minute: a small one tells the rate
    bf16_matmul = in_fresh_process(
        {"kind": "matmul", "size": size if fast_bf16 else 256, "repeats": 2, "dtype": "bfloat16"}
    )
    step_shape = {"kind": "matmul", "size": 2048, "rows": 32, "inner": 3072, "repeats": repeats * 4}
    step_rates = {
        "float32": in_fresh_process(step_shape)["gflops"],
        "bfloat16": in_fresh_process({**step_shape, "dtype": "bfloat16"})["gflops"] if fast_bf16 else None,
    }
    step_flops, start_flops = decoder_flops(sat_config(), REGION_DIM)
    report = {
        "mode": "quick" if quick else "full",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            **cpu_description(),
            "threads": matmul["threads"],
            "torch": torch.__version__,
            "bf16_matrix_instructions": fast_bf16,
            # what --precision auto / mixed_precision: auto choose here (probed in a child too: a parent that has run
            # torch products before forking can hang its children's thread pools)
            "bf16_pays": in_fresh_process({"kind": "probe"})["bf16_pays"],
        },
        "matmul_gflops": {"float32": matmul["gflops"], "bfloat16": bf16_matmul["gflops"]},
        "step_matmul_gflops": step_rates,  # at a decoder step's shape, 32 x 3072 x 2048
        "decoder_gflop_per_token": step_flops / 1e9,
        "decoder_gflop_per_caption_start": start_flops / 1e9,
    }
    precisions = ["float32", "bfloat16"] if fast_bf16 else ["float32"]
    train_batch, end_to_end_batch = 32, 4 if quick else 32
    end_to_end_repeats = 1 if quick else repeats
    cached = {}
    for precision in precisions:
        case = in_fresh_process(
            {
                "kind": "train",
                "batch": train_batch,
                "repeats": repeats,
                "inputs": "features",
                "variant": "bf16" if precision == "bfloat16" else "",
            }
        )
        case["fraction_of_matmul_rate"] = case["decoder_gflops"] / report["matmul_gflops"][precision]
        cached[precision] = case
    frozen = {"kind": "train", "batch": end_to_end_batch, "repeats": end_to_end_repeats, "inputs": "images"}
    report["training"] = {
        "cached_features": cached["float32"],
        **({"cached_features_bf16": cached["bfloat16"]} if "bfloat16" in cached else {}),
        "frozen_encoder": in_fresh_process(frozen),
        "fine_tuned_encoder": in_fresh_process({**frozen, "trainable_stages": 2}),
    }
    # the Flickr8k CPU recipe's model with its last stage fine-tuning: from the images, or from the cached output of
    # its frozen bottom; against its frozen decoder-only step on cached regions
    lite0 = {"kind": "train", "batch": 8 if quick else 64, "repeats": end_to_end_repeats, "lite0": True}
    report["training"].update(
        {
            "lite0_cached_regions": in_fresh_process({**lite0, "inputs": "features"}),
            "lite0_14x14_cached_regions": in_fresh_process({**lite0, "inputs": "features", "output_stride": 16}),
            "lite0_top_stage_from_cached_bottom": in_fresh_process(
                {**lite0, "inputs": "bottom", "trainable_stages": 1}
            ),
            "lite0_top_stage_from_images": in_fresh_process({**lite0, "inputs": "images", "trainable_stages": 1}),
            "lite0_top_stage_from_cached_bottom_5_captions_per_image": in_fresh_process(
                {**lite0, "inputs": "bottom", "trainable_stages": 1, "captions_per_image": 5}
            ),
        }
    )
    batches = [1, 8] if quick else [1, 32, 64]
    cases = []
    for precision in precisions:
        for beams in (1, 3) if quick else (1, 3, 5):
            for batch in batches:
                for encoder in (False,) if quick else (False, True):
                    cases.append(
                        in_fresh_process(
                            {
                                "kind": "generate",
                                "batch": batch,
                                "beams": beams,
                                "repeats": 1 if quick else 3,
                                "encoder": encoder,
                                "variant": "bf16" if precision == "bfloat16" else "",
                            }
                        )
                    )
    report["generation"] = cases
    report["feature_caching"] = [
        in_fresh_process(
            {"kind": "encode", "network": network, "image_size": side, "batch": 16 if quick else 64, "repeats": repeats}
            | {"precision": precision}
        )
        for network, side in (("tf_efficientnet_lite0", 224), ("tf_efficientnet_lite2", 260))
        for precision in (["float32", "bf16"] if fast_bf16 else ["float32"])
    ]
    three_beams = {c["batch"]: c for c in cases if c["beams"] == 3 and not c["encoder"] and not c["variant"]}
    largest = max(three_beams)
    report["variants"] = [] if quick else measure_variants(report, repeats, fast_bf16)
    report["ratios"] = {
        f"beam3_batch{largest}_vs_batch1_images_per_s": three_beams[largest]["images_per_s"]
        / three_beams[1]["images_per_s"],
        "cached_vs_frozen_end_to_end_per_caption": cached["float32"]["captions_per_s"]
        / report["training"]["frozen_encoder"]["captions_per_s"],
        "training_fraction_of_matmul_rate": cached["float32"]["fraction_of_matmul_rate"],
        **(
            {"training_bf16_fraction_of_bf16_matmul_rate": cached["bfloat16"]["fraction_of_matmul_rate"]}
            if "bfloat16" in cached
            else {}
        ),
    }
    return report


def measure_variants(report: dict, repeats: int, fast_bf16: bool) -> list[dict]:
    """Each other speed option on the cases it targets, against the plain case of this run (same batch, settings)."""
    cached, frozen = report["training"]["cached_features"], report["training"]["frozen_encoder"]
    plain_generation = {(c["batch"], c["beams"], c["encoder"]): c for c in report["generation"] if not c["variant"]}
    end_to_end = ("channels_last", "bf16", "channels_last+bf16") if fast_bf16 else ("channels_last",)
    trials = []  # (label, plain case, spec of the case with the option, the figure compared)
    for inputs, plain, variants in [("features", cached, ("compile",)), ("images", frozen, end_to_end)]:
        label = f"training, {'cached features' if inputs == 'features' else 'frozen encoder'} ({plain['batch']})"
        spec = {"kind": "train", "batch": plain["batch"], "repeats": repeats, "inputs": inputs}
        trials += [(label, plain, {**spec, "variant": variant}, "captions_per_s") for variant in variants]
    generation = [(1, 3, False, "compile"), (32, 3, False, "compile")]
    # transformers' generation loop against a minimal one over the same model and cache, one picture at a time
    generation += [(1, beams, False, "minimal_loop") for beams in (1, 3)]
    if fast_bf16:
        generation += [(32, 3, False, "compile+bf16"), (32, 3, True, "channels_last+bf16")]
    for batch, beams, encoder, variant in generation:
        label = f"{'greedy' if beams == 1 else f'{beams} beams'}, batch {batch}, encoder {'in' if encoder else 'out'}"
        spec = {"kind": "generate", "batch": batch, "beams": beams, "repeats": 3, "encoder": encoder}
        trials.append((label, plain_generation[(batch, beams, encoder)], {**spec, "variant": variant}, "images_per_s"))
    results = []
    for label, plain, spec, figure in trials:
        case = in_fresh_process(spec)
        results.append(
            {
                "case": label,
                "variant": spec["variant"],
                "unit": figure.replace("_per_s", "/s"),
                "value": case[figure],
                "plain": plain[figure],
                "peak_mib": case["peak_mib"],
            }
        )
    return results


def table(report: dict) -> str:
    rates = report["matmul_gflops"]
    bf16_note = (
        ""
        if report["machine"]["bf16_matrix_instructions"]
        else (" (no AVX512-BF16/AMX on this CPU: the bf16 cases are skipped)")
    )
    machine, step = report["machine"], report.get("step_matmul_gflops", {})
    step_bf16 = f"{step['bfloat16']:.0f}" if step.get("bfloat16") else "-"
    lines = [
        f"machine: {machine.get('model_name', machine['cpu'])}, flags {' '.join(machine.get('flags', [])) or '-'}; "
        f"bf16 pays here: {machine.get('bf16_pays', '?')}",
        f"matrix multiply ({report['machine']['threads']} threads): float32 {rates['float32']:.0f} GFLOP/s, "
        f"bf16 {rates['bfloat16']:.1f} GFLOP/s{bf16_note}; at a decoder step's shape (32 x 3072 x 2048) float32 "
        f"{step.get('float32', 0):.0f}, bf16 {step_bf16} GFLOP/s",
        f"decoder: {report['decoder_gflop_per_token'] * 1e3:.1f} MFLOP per token, "
        f"{report['decoder_gflop_per_caption_start'] * 1e3:.0f} MFLOP per caption start (forward)",
        "",
        "| training (batch) | ms/step | captions/s | share of the matmul rate | peak MiB |",
        "|---|---|---|---|---|",
    ]
    for name, case in report["training"].items():
        share = f"{case['fraction_of_matmul_rate']:.0%}" if "fraction_of_matmul_rate" in case else ""
        lines.append(
            f"| {name} ({case['batch']}) | {case['ms_per_step']:.0f} | {case['captions_per_s']:.1f} | "
            f"{share} | {case['peak_mib']:.0f} |"
        )
    lines += ["", "| generation | batch | images/s | ms/image | peak MiB |", "|---|---|---|---|---|"]
    for case in report["generation"]:
        label = f"{'greedy' if case['beams'] == 1 else str(case['beams']) + ' beams'}, encoder {'in' if case['encoder'] else 'out'}"
        label += ", bf16" if case["variant"] else ""
        lines.append(
            f"| {label} | {case['batch']} | {case['images_per_s']:.1f} | {case['ms_per_image']:.1f} | "
            f"{case['peak_mib']:.0f} |"
        )
    if report.get("feature_caching"):
        lines += ["", "| feature caching (channels_last) | size | encoder pass | images/s |", "|---|---|---|---|"]
        for case in report["feature_caching"]:
            lines.append(
                f"| {case['network']} | {case['image_size']} | {case['precision']} | {case['images_per_s']:.1f} |"
            )
    if report["variants"]:
        lines += ["", "| option | case | plain | with option | speed-up | peak MiB |", "|---|---|---|---|---|---|"]
        for v in report["variants"]:
            lines.append(
                f"| {v['variant']} | {v['case']} | {v['plain']:.1f} {v['unit']} | {v['value']:.1f} | "
                f"{v['value'] / v['plain']:.2f}x | {v['peak_mib']:.0f} |"
            )
    lines += ["", *(f"{name}: {value:.2f}" for name, value in report["ratios"].items())]
    return "\n".join(lines)


def app_latency(model_dir: str, pictures: list[str], requests: int = 30, num_beams: int = 3) -> dict:
    """The attention explorer's per-request latency: the page served on a local port in this process, `requests`
    captions through gradio_client one after another (each with the first word's attention view, as the page shows
    it), after one warm-up; seconds at p50 and p95."""
    import socket

    from gradio_client import Client, handle_file
    from transformers import AutoModel, AutoProcessor

    from . import modeling_captioner, processing_captioner  # noqa: F401  (register the Auto classes)
    from .app import Explorer, build_app

    model = AutoModel.from_pretrained(model_dir).eval()
    page = build_app(Explorer(model, AutoProcessor.from_pretrained(model_dir)))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    page.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        arguments = (num_beams, "beam search", int(model.generation_config.max_new_tokens or 30), "")
        client.predict(handle_file(pictures[0]), *arguments, api_name="/caption")
        seconds = []
        for i in range(requests):
            started = time.perf_counter()
            client.predict(handle_file(pictures[i % len(pictures)]), *arguments, api_name="/caption")
            seconds.append(time.perf_counter() - started)
    finally:
        page.close()
    seconds.sort()
    return {
        "model": model_dir,
        "requests": requests,
        "num_beams": num_beams,
        "torch_threads": torch.get_num_threads(),
        "p50_seconds": seconds[len(seconds) // 2],
        "p95_seconds": seconds[min(len(seconds) - 1, int(0.95 * len(seconds)))],
    }
