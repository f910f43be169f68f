"""What every command shares: logging set-up and the inference speed flags. It imports nothing else from the
package, so any layer may use it."""

from __future__ import annotations

import argparse
import logging


def configure_logging() -> None:
    """INFO for this package, warnings only from Accelerate's per-file checkpoint messages."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)


def add_speed_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `hf_captioner.inference.speed_options`, for the commands that caption."""
    parser.add_argument(
        "--bf16", action="store_true", help="autocast to bfloat16 (faster on CPUs with AVX512-BF16/AMX)"
    )
    parser.add_argument("--channels_last", action="store_true", help="NHWC convolutions in the encoder")
    parser.add_argument("--compile", action="store_true", help="torch.compile the decoder step")
