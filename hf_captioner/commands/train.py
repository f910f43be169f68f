"""Train the captioner: `hf-captioner train --config configs/sample.yaml [--field value ...]`, or on several
processes `accelerate launch -m hf_captioner.commands.train --config ...`.

Every field of `hf_captioner.arguments.TrainingArguments` can be set in the YAML file or on the command line;
`--model_config key=value` sets one field of the model configuration.
"""

import logging
import sys

from hf_captioner.arguments import SettingsError, parse_arguments
from hf_captioner.cli import configure_logging

logger = logging.getLogger("hf_captioner.training")


def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    args = parse_arguments(argv)  # --help and every bad value stop here, before torch is imported
    from hf_captioner.data import DataError
    from hf_captioner.training import train

    try:
        return train(args)
    except (DataError, SettingsError, FileExistsError, FileNotFoundError) as err:  # the user's data, settings, folders
        logger.debug("The run stopped", exc_info=True)
        sys.exit(f"hf-captioner train: error: {err}")


if __name__ == "__main__":
    main()
