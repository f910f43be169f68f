"""Evaluate a saved captioner on a split: `hf-captioner evaluate --model runs/sample/final --split test`.

Writes predictions.jsonl (image id, caption, references) and metrics.json (BLEU-1..4, METEOR where Java is present,
ROUGE-L, CIDEr-D, with beam size, split and counts; where boxes of the named things exist (the sample data's
shapes, or Flickr30k Entities: found as flickr30k_entities.json in the data folder, or --entities FILE) also where
the attention goes) and prints a table. Deterministic for a fixed model and settings.
"""

import argparse
import dataclasses
import json
import typing
from pathlib import Path

from hf_captioner.arguments import DATA_LAYOUT_ARGUMENTS, DataArguments
from hf_captioner.attention_measures import ENTITIES_FILE, find_entities_file, load_flickr30k_entities
from hf_captioner.cli import (
    CommandParser,
    add_model_arguments,
    add_speed_arguments,
    configure_logging,
    load_captioner,
    non_negative_int,
    positive_int,
)


def add_layout_arguments(parser: argparse.ArgumentParser) -> None:
    """The training run's options for reading a Hub data set or a local copy of one, with their help texts."""
    group = parser.add_argument_group(
        "Hub data or a local copy (default: the preset of --data / --data_preset, or "
        "the model's training run when it read the same --data)"
    )
    for field in dataclasses.fields(DataArguments):
        if field.name in DATA_LAYOUT_ARGUMENTS:
            many = typing.get_origin(field.type) is not None and list in typing.get_args(field.type)
            group.add_argument(
                f"--{field.name}", nargs="+" if many else None, default=None, help=field.metadata["help"]
            )


def load_split(args: argparse.Namespace):
    """The split to score. The sample data set is redrawn as the model's training run drew it (with its boxes); other
    data is read with the run's layout settings when the run read the same --data, then the ones given here."""
    from hf_captioner.data import detect_and_load, hub_layout, make_sample_dataset

    args_file = Path(args.model) / "training_args.json"
    trained = json.loads(args_file.read_text()) if args_file.is_file() else {}
    data, split = args.data, args.split
    if data != "sample":  # --strict is about the split being scored, not the others
        settings = {name: trained.get(name) for name in DATA_LAYOUT_ARGUMENTS} if trained.get("data") == data else {}
        settings.update({name: getattr(args, name) for name in DATA_LAYOUT_ARGUMENTS if getattr(args, name)})
        layout = hub_layout(data, settings)
        return detect_and_load(
            data, images_dir=args.images_dir, strict=[split] if args.strict else False, layout=layout
        )[split]
    sizes = trained.get("sample_sizes", [2000, 200, 200])
    return make_sample_dataset(
        *sizes, seed=trained.get("sample_seed", 0), image_size=trained.get("sample_image_size", 64)
    )[split]


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--data", default="sample", help="'sample', a data folder/file in a known layout, or a Hub id")
    parser.add_argument(
        "--images_dir", default=None, help="where the images are, when not in the layout's default place"
    )
    parser.add_argument("--split", default="test", choices=["train", "validation", "test"], help="the split to score")
    parser.add_argument("--num_beams", type=positive_int, default=3, help="beam search width (1: greedy)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images captioned at once")
    parser.add_argument("--max_new_tokens", type=positive_int, default=30, help="the longest caption, in tokens")
    parser.add_argument("--max_images", type=positive_int, default=None, help="score only the first N images")
    parser.add_argument("--output_dir", default=None, help="default: <model>/eval-<split>-beam<N>")
    parser.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="replace the predictions and metrics an earlier evaluation wrote there",
    )
    parser.add_argument(
        "--strict",
        action="store_true",
        help="a missing or unreadable image of the split is an error, not a counted skip",
    )
    parser.add_argument("--no_meteor", action="store_true", help="skip METEOR even where Java is present")
    parser.add_argument(
        "--no_repeat_ngram_size",
        type=non_negative_int,
        default=None,
        help="forbid repeating any n-gram of this size, 0: allow (default: the model's generation config)",
    )
    parser.add_argument(
        "--repetition_penalty",
        type=float,
        default=None,
        help="> 1 discourages tokens already generated (default: the model's generation config)",
    )
    parser.add_argument(
        "--length_penalty",
        type=float,
        default=None,
        help="beam search: > 0 favours longer captions (default: the model's generation config)",
    )
    parser.add_argument(
        "--entities",
        default=None,
        help=f"Flickr30k Entities boxes (JSON) for the attention measures; default: {ENTITIES_FILE} "
        "in the --data folder when it is there",
    )
    add_layout_arguments(parser)
    add_speed_arguments(parser, precision="float32")  # scores that do not depend on the machine, unless asked
    args = parser.parse_args(argv)
    if args.repetition_penalty is not None and args.repetition_penalty <= 0:
        parser.error(f"argument --repetition_penalty: expected a number > 0, got {args.repetition_penalty}")
    output_dir = args.output_dir or str(Path(args.model) / f"eval-{args.split}-beam{args.num_beams}")
    earlier = [name for name in ("predictions.jsonl", "metrics.json") if (Path(output_dir) / name).is_file()]
    if earlier and not args.overwrite_output_dir:
        parser.error(
            f"{output_dir} already holds an evaluation ({', '.join(earlier)}): pass --overwrite_output_dir "
            "to replace it, or --output_dir for another folder"
        )
    configure_logging()
    from hf_captioner.data import DataError
    from hf_captioner.evaluation import evaluate_split, format_table  # torch: only once there is work
    from hf_captioner.inference import speed_options, use_bf16

    model, processor = load_captioner(args, parser)
    try:
        dataset = load_split(args)
    except DataError as error:
        parser.error(f"--data {args.data}: {error}")
    if len(dataset) == 0:
        parser.error(f"the {args.split} split of {args.data} has no images")
    if args.max_images:
        dataset = dataset.select(range(min(args.max_images, len(dataset))))
    entities_file = find_entities_file(args.data, args.entities)
    try:
        entities = load_flickr30k_entities(entities_file) if entities_file else None
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    decoding = {
        name: getattr(args, name)
        for name in ("no_repeat_ngram_size", "repetition_penalty", "length_penalty")
        if getattr(args, name) is not None
    }
    extra = {
        "model": args.model,
        "data": args.data,
        "bf16": use_bf16(args.precision, model.device),
        "compile": args.compile,
        "entities": entities_file,
    }
    with speed_options(model, extra["bf16"], args.channels_last, args.compile):
        metrics = evaluate_split(
            model,
            processor,
            dataset,
            output_dir,
            args.split,
            num_beams=args.num_beams,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            meteor=not args.no_meteor,
            extra=extra,
            entities=entities,
            generate_kwargs=decoding,
        )
    print(format_table(metrics))
    print(f"\nWrote {output_dir}/predictions.jsonl and metrics.json")


if __name__ == "__main__":
    main()
