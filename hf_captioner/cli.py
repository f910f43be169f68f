"""What every command shares: logging set-up, loading a saved captioner, the inference speed flags. It imports
nothing else from the package, so any layer may use it."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Each option's default after its help (unless the help says it, or there is none to say); the command's
    docstring as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        if "default" in text or nothing or not action.option_strings:
            return text
        return super()._get_help_string(action)


class CommandParser(argparse.ArgumentParser):
    """The argument parser of every command: each option's default in `--help`, and the dashed spellings
    (`--num-beams`) that `hf-captioner train` (transformers' HfArgumentParser) takes as well as `--num_beams`.

    The error contract of the commands (docs/training.md): bad input from the user is one line and exit 2
    (`parser.error`); "nothing done" (every input failed) is exit 1; partial success is exit 0 with the skips counted.
    """

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(**kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        known = {option for action in self._actions for option in action.option_strings}
        return super().parse_known_args([self._underscored(arg, known) for arg in args], namespace)

    @staticmethod
    def _underscored(arg: str, known: set[str]) -> str:
        """`--num-beams[=3]` -> `--num_beams[=3]` when that is an option of the command."""
        if not arg.startswith("--") or "-" not in arg[2:].split("=", 1)[0]:
            return arg
        name, equals, value = arg.partition("=")
        spelled = "--" + name[2:].replace("-", "_")
        return spelled + equals + value if spelled in known else arg


def configure_logging() -> None:
    """INFO for this package, warnings only from Accelerate's per-file checkpoint messages."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def whole_number(minimum: int):
    """An argparse type: a whole number >= `minimum`, refused in one line naming the bad text."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum}, got {text!r}")
        return value

    return parse


positive_int = whole_number(1)  # beam counts, batch sizes, lengths
non_negative_int = whole_number(0)  # sizes where 0 means "off"


def add_speed_arguments(parser: argparse.ArgumentParser, precision: str = "auto") -> None:
    """The flags of `hf_captioner.inference.speed_options`, for the commands that caption."""
    parser.add_argument(
        "--precision",
        choices=("auto", "float32", "bf16"),
        default=precision,
        help="the products' precision: auto is bf16 only where a probe of this machine shows bf16 faster than "
        "float32 (CPUs with AVX512-BF16 or AMX, most GPUs), and float32 elsewhere",
    )
    parser.add_argument(
        "--bf16", action="store_const", const="bf16", dest="precision", help="the same as --precision bf16"
    )
    parser.add_argument("--channels_last", action="store_true", help="NHWC convolutions in the encoder")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder step")


def model_folder_problem(name: str | None, required: str = "config.json") -> str | None:
    """What is wrong with `name` as a saved model (or, with required="tokenizer.json", processor) folder when it
    names a local folder (a Hub id is left to the Hub); None when nothing is. One line instead of transformers'
    'Repo id must be in the form...'."""
    if not name:
        return None
    folder = Path(name).expanduser()
    if folder.exists() or name.startswith((".", "/", "~")) or name.count("/") > 1:
        if not (folder / required).is_file():
            kind = "model" if required == "config.json" else "processor"
            return f"{name}: not a saved {kind} folder (no {required})"
    return None


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model and --trust_remote_code, for the commands that load a saved captioner."""
    parser.add_argument("--model", required=True, help="saved model folder, or a Hub id")
    parser.add_argument(
        "--trust_remote_code",
        action="store_true",
        help="run the model folder's own code (needed only for captioners this package does not know)",
    )


def load_captioner(args: argparse.Namespace, parser: argparse.ArgumentParser):
    """The model (in eval mode) and processor of `args.model`. Folders of this package load with its own code;
    the folder's copied code runs only with --trust_remote_code. A bad folder or id is one line, not a traceback."""
    from transformers import AutoModel, AutoProcessor

    from hf_captioner import CaptionerForConditionalGeneration  # noqa: F401  (registers the Auto classes)

    problem = model_folder_problem(args.model)
    if problem:
        parser.error(f"--model {problem}")
    try:
        model = AutoModel.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    except (OSError, ValueError) as err:
        parser.error(f"--model {args.model}: {str(err).splitlines()[0]}")
    return model.eval(), processor
