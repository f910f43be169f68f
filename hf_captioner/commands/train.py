"""Train the captioner: `hf-captioner train --config configs/sample.yaml [--field value ...]`, or on several
processes `accelerate launch -m hf_captioner.commands.train --config ...`.

Every field of `hf_captioner.arguments.TrainingArguments` can be set in the YAML file or on the command line;
`--model key=value` sets one field of the model configuration.
"""

from hf_captioner.training import main

if __name__ == "__main__":
    main()
