"""The demo on the embedded sample data: draw it, train on the CPU, caption held-out pictures, score the test split.

`make demo` runs this; every step is the real one a Flickr user runs (the loader reads the written folder, training
goes through Accelerate, the model is saved and loaded back with the Auto classes).
"""

import argparse
import logging
import time
from pathlib import Path

from transformers import AutoModel, AutoProcessor

from hf_captioner.data import detect_and_load, write_sample_dataset
from hf_captioner.scoring import score_captions
from hf_captioner.training import configure_logging, generate_captions, parse_arguments, train

logger = logging.getLogger("demo")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/sample.yaml")
    parser.add_argument("--data_dir", default="data/sample")
    parser.add_argument("--output_dir", default="runs/sample")
    parser.add_argument("--num_beams", type=int, default=3)
    options = parser.parse_args()
    configure_logging()
    started = time.perf_counter()

    args = parse_arguments(["--config", options.config, "--data", options.data_dir, "--output_dir", options.output_dir])
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
    test = detect_and_load(options.data_dir)["test"]
    captions = generate_captions(model, processor, test, batch_size=100, num_beams=options.num_beams)
    scores = score_captions(captions, test["captions"])

    print(f"\nCaptions of held-out sample pictures ({options.num_beams} beams):")
    for image_id, caption, references in list(zip(test["image_id"], captions, test["captions"], strict=True))[:8]:
        print(f"  {image_id}: {caption!r:50}  e.g. reference {references[0]!r}")
    print(f"\nSample test split ({len(test)} pictures, {options.num_beams} beams):")
    print("  " + "  ".join(f"{name.upper().replace('_', '-')} {value:.3f}" for name, value in scores.items()))
    print(
        f"\nModel saved to {final}; training {trained - started:.0f} s, whole demo {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
