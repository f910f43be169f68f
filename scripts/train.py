"""Train the captioner: `accelerate launch scripts/train.py --config configs/sample.yaml [--field value ...]`.

Every field of `hf_captioner.training.TrainingArguments` can be set in the YAML file or on the command line;
`--model key=value` sets one field of the model configuration.
"""

from hf_captioner.training import main

if __name__ == "__main__":
    main()
