"""Speed and memory of training and captioning on this machine: `hf-captioner benchmark [--quick] [--out F]`.

Cases (Show, Attend and Tell sizes: 2048-d regions on a 14 x 14 grid, embedding/attention/hidden 512, 10,000 words,
captions of Flickr-like lengths):
- training step (forward + backward + AdamW) of the decoder on cached region features, batch 32;
- the same end to end through a ResNet-101-shaped encoder, frozen, and with its last two stages fine-tuned;
- the Flickr8k CPU recipe's model (EfficientNet-Lite0, 7 x 7 x 1280 regions, 4,000 words), batch 64: on cached
  regions (also 14 x 14 of them, its last stage dilated), and with its last stage fine-tuning, from the images or
  from the cached output of its frozen bottom (one image per caption, and five captions per image as
  `group_captions_by_image` batches them);
- caption generation, greedy and 3 / 5 beams, one image at a time and in batches, encoder included and excluded;
- training on cached features and captioning in float32 and, where the CPU multiplies bfloat16 in hardware
  (AVX512-BF16 or AMX), under bf16 autocast; elsewhere the bf16 cases are skipped (torch's fallback is hundreds of
  times slower) and the report says so;
- the other speed options (channels_last, torch.compile of the decoder step) on the cases they target;
- the machine's own float32 and bf16 matrix-multiply rates, measured in the same run, and how much of its
  precision's rate the training step uses.
`--app MODEL` measures instead the attention explorer's per-request latency (p50 / p95) for a saved model, on the
pictures of `--app_pictures DIR` (default: a few of the sample set's).
Every case runs in a fresh process (forked before any computation), so its peak resident memory above the
process's level after building the model and inputs is its own. `--quick` shrinks repetitions and batch sizes so
the whole run takes about a minute; its figures are rougher.
"""

import json
from pathlib import Path

from hf_captioner.cli import CommandParser


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="about a minute, rougher figures")
    parser.add_argument("--out", default="benchmark.json", help="where to write the JSON report")
    parser.add_argument("--app", metavar="MODEL", help="instead: the app's per-request latency for this model folder")
    parser.add_argument("--app_pictures", metavar="DIR", help="--app: the pictures to caption")
    parser.add_argument("--app_requests", type=int, default=30, help="--app: requests timed")
    args = parser.parse_args(argv)
    if args.app:
        from hf_captioner.benchmarking import app_latency
        from hf_captioner.commands.app import example_pictures

        report = app_latency(args.app, example_pictures(args.app_pictures), args.app_requests)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(
            f"app latency over {report['requests']} requests ({report['num_beams']} beams): "
            f"p50 {report['p50_seconds']:.3f} s, p95 {report['p95_seconds']:.3f} s"
        )
        return
    from hf_captioner.benchmarking import run, table  # torch: only once there is work

    report = run(args.quick)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))
    print(f"\nReport: {args.out}")


if __name__ == "__main__":
    main()
