"""Caption pictures: `hf-captioner caption --model runs/sample/final photo.jpg folder/ https://... [--attention out/]`.

With `--attention DIR`, one figure per picture shows, word by word, where the model looked.
"""

import io
import logging
import sys
import urllib.request
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

from hf_captioner.attention_measures import load_flickr30k_entities, named_boxes, picture_regions
from hf_captioner.cli import CommandParser, add_model_arguments, add_speed_arguments, load_captioner, positive_int

logger = logging.getLogger("hf_captioner.caption")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def fetch(url: str, timeout: float = 15.0) -> Image.Image:
    """Download a picture; without network access this fails at once with a message that says so."""
    from hf_captioner.processing_captioner import open_image, to_rgb

    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as err:
        raise ValueError(f"Could not download {url} ({err}); is this machine offline?") from None
    return to_rgb(open_image(io.BytesIO(data), name=url))


def collect(inputs: list[str]) -> list[str]:
    """Every file, every picture in a folder and its sub-folders (sorted by path), and every URL, in the order given.
    A ValueError names an input that is none of these, or inputs that hold no picture."""
    found = []
    for item in inputs:
        if item.startswith(("http://", "https://")) or Path(item).is_file():
            found.append(item)
        elif Path(item).is_dir():
            pictures = (p for p in Path(item).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            found += [str(p) for p in sorted(pictures)]
        else:
            raise ValueError(f"not a file, folder or URL: {item}")
    if not found:
        raise ValueError(f"no pictures ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {', '.join(inputs)}")
    return found


def load_picture(name: str) -> Image.Image:
    """The picture at a path or URL, in RGB; a ValueError naming it when it cannot be read."""
    from hf_captioner.processing_captioner import open_image, to_rgb

    return fetch(name) if name.startswith(("http://", "https://")) else to_rgb(open_image(name))


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or URLs")
    add_model_arguments(parser)
    parser.add_argument("--num_beams", type=positive_int, default=3, help="beam search width (1: greedy)")
    parser.add_argument("--max_new_tokens", type=positive_int, default=30, help="the longest caption, in tokens")
    parser.add_argument("--batch_size", type=positive_int, default=16, help="pictures read and captioned at once")
    parser.add_argument("--attention", metavar="DIR", help="write one attention figure per picture here")
    parser.add_argument(
        "--entities",
        metavar="FILE",
        help="Flickr30k Entities boxes (JSON): on each word's panel, draw the reference boxes of what "
        "it names (pictures matched by file name)",
    )
    add_speed_arguments(parser)
    args = parser.parse_args(argv)
    try:
        names = collect(args.inputs)  # a wrong path is said before the model loads
    except ValueError as error:
        parser.error(str(error))
    from hf_captioner.inference import caption_with_attention, speed_options, use_bf16  # torch: once there is work
    from hf_captioner.visualize import plot_attention

    model, processor = load_captioner(args, parser)
    try:
        entities = load_flickr30k_entities(args.entities) if args.entities else {}
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    speed = speed_options(model, use_bf16(args.precision, model.device), args.channels_last, args.compile)
    if args.attention:
        Path(args.attention).mkdir(parents=True, exist_ok=True)
    skipped = 0
    progress = tqdm(total=len(names), unit="picture", desc="Captioning", disable=None)  # stderr; off when not a tty
    for start in range(0, len(names), args.batch_size):  # pictures are read batch by batch, not all at once
        batch = []
        for name in names[start : start + args.batch_size]:
            try:
                batch.append((name, load_picture(name)))
            except ValueError as err:  # one bad picture must not cost the others their captions
                logger.warning("skipped: %s", err)
                skipped += 1
        if not batch:
            progress.update(len(names[start : start + args.batch_size]))
            continue
        with speed:
            captions, attentions = caption_with_attention(
                model,
                processor,
                [image for _, image in batch],
                attention=bool(args.attention),
                num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens,
            )
        for index, ((name, image), caption) in enumerate(zip(batch, captions, strict=True)):
            line = f"{name}\t{caption}"
            if attentions is not None and attentions[index]:
                words = attentions[index]
                stem = Path(name.rstrip("/").split("/")[-1]).stem or f"image{start + index}"
                figure = Path(args.attention) / f"{start + index:04d}-{stem}.png"
                entry = entities.get(stem)
                regions = picture_regions(entry, image.size) if entry is not None else []
                boxes = [named_boxes(regions, words, i) for i in range(len(words))] if regions else None
                plot_attention(
                    image,
                    [w.word for w in words],
                    [w.attention for w in words],
                    figure,
                    boxes=boxes,
                    sentinel=[w.sentinel for w in words],
                )
                line += f"\t{figure}"
            progress.write(line, file=sys.stdout)
        progress.update(len(names[start : start + args.batch_size]))
    progress.close()
    if skipped == len(names):
        logger.error("none of the %d picture(s) could be read: nothing captioned", len(names))
        sys.exit(1)
    if skipped:
        logger.warning("%d of %d picture(s) could not be read and were skipped", skipped, len(names))


if __name__ == "__main__":
    main()
