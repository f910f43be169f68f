"""The demo on the embedded sample data: draw it, train on the CPU, caption held-out pictures, score the test split,
measure where attention points, and draw attention figures.

`make demo` runs this; every step is the real one a Flickr user runs (the loader reads the written folder, training
goes through Accelerate, the model is saved and loaded back with the Auto classes).
"""

import json
import logging
import time
from pathlib import Path

from hf_captioner.arguments import parse_arguments
from hf_captioner.cli import CommandParser, configure_logging
from hf_captioner.model_card import FIGURES_DIR

logger = logging.getLogger("demo")


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--config", default="configs/sample.yaml", help="the training run's YAML config")
    parser.add_argument("--data_dir", default="data/sample", help="where the sample data set is written (once)")
    parser.add_argument("--output_dir", default="runs/sample", help="the run's folder (trained afresh each time)")
    parser.add_argument("--num_beams", type=int, default=3, help="beam search width of the captions scored")
    options = parser.parse_args(argv)
    configure_logging()
    from transformers import AutoModel, AutoProcessor  # torch: only once there is work

    from hf_captioner import CaptionerForConditionalGeneration  # noqa: F401  (registers the Auto classes)
    from hf_captioner.data import make_sample_dataset, write_sample_dataset
    from hf_captioner.evaluation import evaluate_split, format_table
    from hf_captioner.inference import caption_with_attention
    from hf_captioner.training import train
    from hf_captioner.visualize import plot_attention

    started = time.perf_counter()

    args = parse_arguments(
        [
            "--config",
            options.config,
            "--data",
            options.data_dir,
            "--output_dir",
            options.output_dir,
            "--overwrite_output_dir",
            "true",
        ]
    )  # the demo trains afresh every time
    if not (Path(options.data_dir) / "dataset_sample.json").is_file():
        write_sample_dataset(
            options.data_dir, *args.sample_sizes, seed=args.sample_seed, image_size=args.sample_image_size
        )
        logger.info("Wrote the sample data set to %s", options.data_dir)
    train(args)
    trained = time.perf_counter()

    final = Path(options.output_dir) / "final"
    model = AutoModel.from_pretrained(final).eval()
    processor = AutoProcessor.from_pretrained(final)
    test = make_sample_dataset(*args.sample_sizes, seed=args.sample_seed, image_size=args.sample_image_size)["test"]
    evaluation_dir = final / f"eval-test-beam{options.num_beams}"
    metrics = evaluate_split(
        model, processor, test, evaluation_dir, "test", num_beams=options.num_beams, batch_size=100
    )

    print(f"\nCaptions of held-out sample pictures ({options.num_beams} beams):")
    predictions = [json.loads(line) for line in (evaluation_dir / "predictions.jsonl").read_text().splitlines()]
    for row in predictions[:8]:
        print(f"  {row['image_id']}: {row['caption']!r:60}  e.g. reference {row['references'][0]!r}")
    print(f"\nSample test split ({len(test)} pictures):\n" + format_table(metrics))

    figures = final / FIGURES_DIR  # beside the weights, so the model card shows one
    figures.mkdir(exist_ok=True)
    pictures = test.select(range(3))
    _, attentions = caption_with_attention(model, processor, pictures["image"], num_beams=options.num_beams)
    for image_id, image, words in zip(pictures["image_id"], pictures["image"], attentions, strict=True):
        plot_attention(
            image,
            [w.word for w in words],
            [w.attention for w in words],
            figures / f"{image_id}.png",
            sentinel=[w.sentinel for w in words],
        )
    print(f"\nAttention figures: {figures}/")
    print(
        f"Model saved to {final}; training {trained - started:.0f} s, whole demo {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
