"""Serve the attention explorer: `hf-captioner app --model runs/sample/final` (then open http://127.0.0.1:7860).

A Gradio page: a picture in (upload, paste, webcam, or an example), decoding controls, the caption and its words;
choosing a word shows where the model looked for it. Needs the app extra: pip install 'hf-captioner[app]'.
"""

import logging
import tempfile
from pathlib import Path

from hf_captioner.cli import (
    CommandParser,
    add_model_arguments,
    configure_logging,
    load_captioner,
    positive_int,
)

logger = logging.getLogger("hf_captioner.app")
EXAMPLE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def example_pictures(folder: str | None, count: int = 4) -> list[str]:
    """The pictures of --examples, else a few of the sample set's (written to a temporary folder)."""
    if folder:
        return [str(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in EXAMPLE_SUFFIXES]
    from hf_captioner.data import make_sample_dataset

    target = Path(tempfile.mkdtemp(prefix="captioner-examples-"))
    pictures = make_sample_dataset(0, 0, count, seed=1, image_size=128)["test"]
    for image_id, image in zip(pictures["image_id"], pictures["image"], strict=True):
        image.save(target / f"{image_id}.png")
    return [str(p) for p in sorted(target.iterdir())]


def boxes_from_entities(path: str):
    """`boxes_for(name, words, size)` for the explorer: each word's Flickr30k Entities boxes, by picture file name."""
    from hf_captioner.attention_measures import load_flickr30k_entities, named_boxes, picture_regions
    from hf_captioner.inference import WordAttention

    entities = load_flickr30k_entities(path)

    def boxes_for(name: str, words: list[str], size: tuple[int, int]):
        entry = entities.get(name)
        if entry is None:
            return None
        regions = picture_regions(entry, size)
        placed = [WordAttention(word, None) for word in words]
        return [named_boxes(regions, placed, i) or [] for i in range(len(words))]

    return boxes_for


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    add_model_arguments(parser)
    parser.add_argument("--examples", metavar="DIR", help="a folder of example pictures (default: the sample set's)")
    parser.add_argument(
        "--entities",
        metavar="FILE",
        help="Flickr30k Entities boxes (JSON): drawn on a data-set picture's words (pictures matched by file name)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=positive_int, default=7860, help="the port to serve on")
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bf16"),
        default="auto",
        help="auto: bf16 only where a probe of this machine shows it faster than float32",
    )
    args = parser.parse_args(argv)
    if args.examples and not Path(args.examples).is_dir():
        parser.error(f"--examples {args.examples}: not a folder")
    try:
        import gradio  # noqa: F401
    except ImportError:
        parser.error("the app needs gradio: pip install 'hf-captioner[app]'")
    configure_logging()
    from hf_captioner.app import Explorer, build_app
    from hf_captioner.model_card import model_facts

    model, processor = load_captioner(args, parser)
    try:
        boxes_for = boxes_from_entities(args.entities) if args.entities else None
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    defaults = {k: getattr(model.generation_config, k) for k in ("num_beams", "max_new_tokens")}
    page = build_app(
        Explorer(model, processor, boxes_for),
        facts=model_facts(args.model),
        defaults=defaults,
        examples=example_pictures(args.examples),
    )
    page.launch(server_name=args.host, server_port=args.port, show_error=True)


if __name__ == "__main__":
    main()
