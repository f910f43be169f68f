"""Caption pictures: `hf-captioner caption --model runs/sample/final photo.jpg folder/ https://... [--attention out/]`.

With `--attention DIR`, one figure per picture shows, word by word, where the model looked.
"""

import argparse
import io
import urllib.request
from pathlib import Path

from PIL import Image

import hf_captioner  # noqa: F401  (registers the Auto classes)
from hf_captioner.cli import add_model_arguments, add_speed_arguments, load_captioner
from hf_captioner.inference import caption_with_attention, speed_options
from hf_captioner.processing_captioner import open_image, to_rgb
from hf_captioner.visualize import plot_attention

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def fetch(url: str, timeout: float = 15.0) -> Image.Image:
    """Download a picture; without network access this fails at once with a message that says so."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            data = response.read()
    except OSError as err:
        raise SystemExit(f"Could not download {url} ({err}); is this machine offline?") from None
    try:
        return to_rgb(Image.open(io.BytesIO(data)))
    except OSError:
        raise SystemExit(f"{url} did not return a readable image") from None


def collect(inputs: list[str]) -> list[tuple[str, Image.Image]]:
    """(name, picture) for every file, every picture in a folder (sorted), and every URL."""
    found = []
    for item in inputs:
        if item.startswith(("http://", "https://")):
            found.append((item, fetch(item)))
        elif Path(item).is_dir():
            for path in sorted(p for p in Path(item).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                found.append((str(path), to_rgb(open_image(path))))
        elif Path(item).is_file():
            found.append((item, to_rgb(open_image(item))))
        else:
            raise SystemExit(f"Not a file, folder or URL: {item}")
    if not found:
        raise SystemExit("No pictures found in " + ", ".join(inputs))
    return found


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("inputs", nargs="+", help="image files, folders of images, or URLs")
    add_model_arguments(parser)
    parser.add_argument("--num_beams", type=int, default=3)
    parser.add_argument("--max_new_tokens", type=int, default=30)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--attention", metavar="DIR", help="write one attention figure per picture here")
    add_speed_arguments(parser)
    args = parser.parse_args(argv)

    model, processor = load_captioner(args, parser)
    speed = speed_options(model, args.bf16, args.channels_last, args.compile)
    pictures = collect(args.inputs)
    if args.attention:
        Path(args.attention).mkdir(parents=True, exist_ok=True)
    for start in range(0, len(pictures), args.batch_size):
        batch = pictures[start : start + args.batch_size]
        with speed:
            captions, attentions = caption_with_attention(model, processor, [image for _, image in batch],
                                                          attention=bool(args.attention), num_beams=args.num_beams,
                                                          max_new_tokens=args.max_new_tokens)  # fmt: skip
        for index, ((name, image), caption) in enumerate(zip(batch, captions, strict=True)):
            line = f"{name}\t{caption}"
            if attentions is not None and attentions[index]:
                words = attentions[index]
                stem = Path(name.rstrip("/").split("/")[-1]).stem or f"image{start + index}"
                figure = Path(args.attention) / f"{start + index:04d}-{stem}.png"
                plot_attention(image, [w.word for w in words], [w.attention for w in words], figure)
                line += f"\t{figure}"
            print(line)


if __name__ == "__main__":
    main()
