"""The training run's settings: grouped dataclasses (the groups of `hf-captioner train --help`), read from a YAML file
(`--config`) and then the command line by `transformers.HfArgumentParser`.

`TrainingArguments` is all groups in one flat dataclass (`args.learning_rate`), so a YAML file and the saved
`training_args.json` are one flat mapping of field: value. Every value that can be checked without data is checked
when the arguments are made, so a bad one is one line before any data is read or any picture encoded.
"""

import argparse
import copy
import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from transformers import HfArgumentParser  # torch-free, like this module: `hf-captioner train --help` stays quick

from .cli import model_folder_problem

logger = logging.getLogger(__name__)

OBJECTIVES = ("cross_entropy", "self_critical")
MIXED_PRECISION = ("no", "fp16", "bf16", "auto")
ENCODER_PRECISIONS = ("float32", "bf16", "auto")
# CaptionerConfig fields that the trained tokenizer decides (the run's vocab_size bounds its size)
TOKENIZER_FIELDS = (
    "vocab_size",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "unk_token_id",
    "decoder_start_token_id",
)


class SettingsError(ValueError):
    """Settings that only the built model shows to be wrong (what its backbone can do: dilate, split into stages, give
    a frozen bottom to cache), or a model folder that does not fit the run."""


def option(default, help: str):
    """A field with its `--help` text (list defaults are copied for each instance)."""
    if isinstance(default, list):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataArguments:
    _argument_group_name = "data"
    data: str = option("sample", "'sample' (drawn in memory), a folder or file in a known layout, or a Hub data set")
    images_dir: str | None = option(None, "where the images are, when not in the layout's default place")
    entities: str | None = option(
        None,
        "Flickr30k Entities boxes (JSON) for attention supervision (model_config "
        "attention_supervision_weight > 0); default: flickr30k_entities.json in the --data folder",
    )
    strict: bool = option(False, "a missing or unreadable image is an error instead of a counted skip")
    sample_sizes: list[int] = option([2000, 200, 200], "sample data: train, validation and test pictures")
    sample_seed: int = option(0, "sample data: the seed its pictures are drawn from")
    sample_image_size: int = option(64, "sample data: side of its pictures in pixels")
    max_train_images: int | None = option(None, "use only the first N train images (quick experiments)")
    max_eval_images: int | None = option(None, "validate on only the first N validation images")
    # a Hub data set's layout (or a local copy's): each unset field comes from the preset for --data / --data_preset
    data_preset: str | None = option(
        None,
        "--data is a local copy (parquet / arrow files, a save_to_disk folder) of "
        "this Hub data set: read it with its layout preset, e.g. jxie/flickr8k",
    )
    image_column: str | None = option(
        None,
        "Hub data or a local copy: the picture column (image, bytes, or file "
        "names under images_dir); default: the preset's, else 'image'",
    )
    caption_columns: list[str] | None = option(
        None,
        "Hub data or a local copy: the caption column(s): one of "
        "strings, one of lists, or several (caption_0 ... caption_4); default "
        "'caption'",
    )
    id_column: str | None = option(None, "Hub data or a local copy: the column that groups the rows of one picture")
    split_column: str | None = option(
        None, "Hub data or a local copy: a column naming each row's split (one split holds all)"
    )
    split_names: list[str] | None = option(None, "Hub data or a local copy: FROM=TO split renames, e.g. dev=validation")
    image_folder_column: str | None = option(
        None, "Hub data or a local copy: a column naming each picture's folder under images_dir (COCO: filepath)"
    )


# the data arguments that say how to read a Hub data set or a local copy of one (`evaluate` takes them too)
DATA_LAYOUT_ARGUMENTS = (
    "data_preset",
    "image_column",
    "caption_columns",
    "id_column",
    "split_column",
    "split_names",
    "image_folder_column",
)


@dataclass
class ProcessorArguments:
    _argument_group_name = "tokenizer and image processing"
    processor_path: str | None = option(None, "reuse a saved processor instead of training a tokenizer")
    vocab_size: int = option(10000, "upper bound of the SentencePiece vocabulary (special tokens included)")
    tokenizer_model_type: str = option("unigram", "'unigram' sub-words, or 'word' for a tiny closed vocabulary")
    image_size: int = option(224, "side of the centre crop fed to the encoder")
    resize_size: int | None = option(None, "shorter side before cropping (default: image_size * 8 / 7)")
    max_caption_tokens: int = option(40, "longer training captions are truncated")


@dataclass
class ModelArguments:
    _argument_group_name = "model (and --model_config KEY=VALUE: one CaptionerConfig field, e.g. rnn_type=gru)"
    vision_pretrained: str | None = option(
        None, "start the encoder from this backbone, e.g. microsoft/resnet-101 or timm:tf_efficientnet_lite0"
    )
    vision_checkpoint: str | None = option(None, "the backbone's weights from this local file (timm), e.g. offline")
    init_from: str | None = option(None, "start from a saved captioner folder (e.g. to fine-tune it)")


@dataclass
class ObjectiveArguments:
    _argument_group_name = "objective"
    objective: str = option(
        "cross_entropy",
        f"one of {OBJECTIVES}; self_critical rewards sampled captions with their CIDEr-D (see the README)",
    )
    self_critical_samples: int = option(5, "self_critical: captions sampled per image")
    self_critical_max_new_tokens: int = option(30, "self_critical: the longest sampled caption, in tokens")


@dataclass
class OptimizationArguments:
    _argument_group_name = "optimisation"
    num_epochs: int = option(10, "passes over the training data")
    max_train_steps: int | None = option(None, "stop after this many optimizer steps (overrides num_epochs)")
    batch_size: int = option(32, "training captions per step and process")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step")
    learning_rate: float = option(4e-4, "the decoder's peak learning rate")
    encoder_learning_rate: float = option(1e-4, "the fine-tuned encoder stages' peak learning rate")
    weight_decay: float = option(0.0, "AdamW weight decay")
    lr_scheduler: str = option("cosine", "a transformers scheduler: linear, cosine, constant_with_warmup, ...")
    warmup_steps: int = option(0, "optimizer steps of linear warm-up")
    max_grad_norm: float = option(5.0, "gradients are clipped to this norm (0: no clipping)")
    mixed_precision: str = option(
        "no",
        f"one of {MIXED_PRECISION}: autocast; auto is bf16 only where a probe of "
        "this machine shows bf16 products faster than float32 (docs/performance.md)",
    )
    channels_last: bool = option(False, "NHWC convolutions in the encoder (images through it, feature caching)")
    seed: int = option(42, "seed of the weights, the data order and dropout")
    group_captions_by_image: bool = option(
        False,
        "cross-entropy batches hold all captions of their images (shuffled "
        "image by image), so the encoder, or its fine-tuned top, runs once per "
        "image instead of once per caption",
    )
    num_workers: int = option(0, "DataLoader workers per process")


@dataclass
class EvaluationArguments:
    _argument_group_name = "validation and early stopping"
    eval_batch_size: int = option(64, "images per batch when validating and caching features")
    eval_num_beams: int = option(1, "beams of the validation captions")
    eval_max_new_tokens: int = option(30, "the longest validation caption, in tokens")
    early_stopping_patience: int = option(3, "validations without a better CIDEr-D before stopping (0: never)")
    no_repeat_ngram_size: int = option(
        0,
        "saved in generation_config.json, so every caption of the model (validation "
        "included) never repeats an n-gram of this size; 0: off",
    )


@dataclass
class CheckpointArguments:
    _argument_group_name = "checkpoints"
    output_dir: str = option("runs/sample", "where the run writes checkpoints, best/, final/ and metrics.json")
    checkpoint_every_steps: int = option(0, "also checkpoint every N optimizer steps (0: at each epoch end only)")
    keep_checkpoints: int = option(2, "the last K checkpoints are kept")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder of this output_dir")
    overwrite_output_dir: bool = option(False, "start afresh in an output_dir that holds another run (it is cleared)")


@dataclass
class FeatureCacheArguments:
    _argument_group_name = "feature caching"
    cache_features: bool = option(
        False,
        "run the encoder (or, when its last stages fine-tune, its frozen bottom) "
        "once over the data into an on-disk feature store",
    )
    feature_cache_dir: str = option("~/.cache/hf_captioner/features", "where feature stores live")
    feature_cache_dtype: str = option("float32", "float32, bfloat16 or float16: how the store keeps features")
    feature_cache_precision: str = option(
        "float32",
        "float32, bf16 or auto: the encoder pass that fills the store (bf16 autocast: about 3x the images/s on a "
        "CPU with AVX512-BF16; other features, so another store); auto is bf16 where the probe says it pays",
    )


@dataclass
class LoggingArguments:
    _argument_group_name = "logging"
    log_every_steps: int = option(50, "log the training losses every N optimizer steps")
    report_to: str = option("auto", "'auto' (TensorBoard when installed), 'none', or an Accelerate tracker name")


GROUPS = (
    DataArguments,
    ProcessorArguments,
    ModelArguments,
    ObjectiveArguments,
    OptimizationArguments,
    EvaluationArguments,
    CheckpointArguments,
    FeatureCacheArguments,
    LoggingArguments,
)


@dataclass
class TrainingArguments(*reversed(GROUPS)):  # dataclass fields follow the bases in reverse: data comes first
    """Everything a run needs, flat; see the groups for each field's meaning."""

    model: dict = field(default_factory=dict, metadata={"help": "CaptionerConfig fields, e.g. {rnn_type: gru}"})

    def __post_init__(self):
        """Values that are wrong whatever the data: refused before any data is read or any picture encoded."""
        from transformers import SchedulerType

        from .data.feature_store import STORE_DTYPES

        for name, choices in (
            ("objective", OBJECTIVES),
            ("lr_scheduler", [kind.value for kind in SchedulerType]),
            ("mixed_precision", MIXED_PRECISION),
            ("feature_cache_dtype", tuple(STORE_DTYPES)),
            ("feature_cache_precision", ENCODER_PRECISIONS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {getattr(self, name)!r}")
        for name in (
            "num_epochs",
            "batch_size",
            "eval_batch_size",
            "gradient_accumulation_steps",
            "eval_num_beams",
            "eval_max_new_tokens",
            "self_critical_samples",
            "self_critical_max_new_tokens",
            "log_every_steps",
            "image_size",
            "max_caption_tokens",
            "sample_image_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a whole number >= 1, got {getattr(self, name)!r}")
        for name in (
            "warmup_steps",
            "num_workers",
            "no_repeat_ngram_size",
            "checkpoint_every_steps",
            "keep_checkpoints",
            "early_stopping_patience",
            "weight_decay",
            "max_grad_norm",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        for name in ("max_train_steps", "max_train_images", "max_eval_images", "resize_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a whole number >= 1 (or none), got {getattr(self, name)!r}")
        if self.vocab_size < 5:
            raise ValueError(f"vocab_size: expected at least 5 (4 special tokens and a word), got {self.vocab_size!r}")
        for name in ("learning_rate", "encoder_learning_rate"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for item in self.split_names or []:
            source, sep, target = item.partition("=")
            if not sep or not source or target not in ("train", "validation", "test"):
                raise ValueError(f"split_names: expected FROM=TO with TO train, validation or test, got {item!r}")
        if len(self.sample_sizes) != 3:
            raise ValueError(f"sample_sizes: expected three numbers (train, validation, test), got {self.sample_sizes}")
        self._check_model()
        if self.cache_features and self.model.get("encoder_trainable_stages") == -1:
            raise ValueError(
                "cache_features: with model.encoder_trainable_stages=-1 the whole encoder fine-tunes and "
                "nothing frozen is left to cache; use encoder_trainable_stages > 0 (the input of the "
                "trainable stages is cached) or cache_features false"
            )
        for name, required in (("init_from", "config.json"), ("processor_path", "tokenizer.json")):
            problem = model_folder_problem(getattr(self, name), required)
            if problem:
                raise ValueError(f"{name}: {problem}")

    def _check_model(self) -> None:
        from .backbones import is_backbone_name, pretrained_source
        from .configuration_captioner import CaptionerConfig

        unknown = set(self.model) - {f.name for f in dataclasses.fields(CaptionerConfig)}
        if unknown:
            raise ValueError(f"model: {sorted(unknown)} are not CaptionerConfig fields")
        from_tokenizer = sorted(set(self.model) & set(TOKENIZER_FIELDS))
        if from_tokenizer:
            raise ValueError(f"model: {from_tokenizer} come from the trained tokenizer (its size is vocab_size)")
        # the model's own values, checked by the config itself; the backbone fields are the pretrained network's
        # when one is named
        given = self.model
        if self.init_from or self.vision_pretrained:
            given = {k: v for k, v in self.model.items() if k not in ("vision_config", "encoder_trainable_stages")}
        if self.init_from:  # the saved model's backbone decides whether it can dilate
            given.pop("vision_output_stride", None)
        elif is_backbone_name(self.vision_pretrained):
            given["vision_backbone"] = pretrained_source(self.vision_pretrained)[0]
        CaptionerConfig(vocab_size=self.vocab_size, **given)


FIELD_HINTS = typing.get_type_hints(TrainingArguments)
FIELD_NAMES = {f.name for f in dataclasses.fields(TrainingArguments)}


def _yaml_value(text: str) -> typing.Any:
    """YAML, except that a number in exponent form without a dot (YAML 1.1 reads "2e-4" as a string) is a float."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


NUMBER_TYPES = {int: int, float: float, int | None: int, float | None: float}


def _check_file_values(values: dict, where: str, error) -> dict:
    """A YAML file's values, typed as the command line types them: numbers in any YAML form, true/false only for
    yes/no fields, lists of whole numbers where a field wants one."""
    for name, value in values.items():
        hint = FIELD_HINTS[name]
        if hint is bool and not isinstance(value, bool):
            error(f"{where}: {name}: expected true or false, got {value!r}")
        if hint == list[int] and not (
            isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        ):
            error(f"{where}: {name}: expected a list of whole numbers such as [2000, 200, 200], got {value!r}")
        kind = NUMBER_TYPES.get(hint)
        if kind is None or value is None or isinstance(value, bool):
            continue
        number = _yaml_value(value) if isinstance(value, str) else value
        if not isinstance(number, (int, float)) or (kind is int and number != int(number)):
            error(f"{where}: {name}: expected {kind.__name__}, got {value!r}")
        values[name] = kind(number)
    return values


def build_parser() -> HfArgumentParser:
    parser = HfArgumentParser(
        GROUPS,
        prog="hf-captioner train",
        usage="%(prog)s [--config FILE.yaml] [--FIELD VALUE ...] [--model_config KEY=VALUE ...]",
        description="Train the captioner. Values come from --config FILE.yaml (flat field: "
        "value), then from the command line.",
    )
    parser.add_argument("--config", help="YAML file of field: value (any field below; model: a mapping)")
    parser.add_argument(
        "--model_config",
        "--model-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one CaptionerConfig field, e.g. --model_config rnn_type=gru (repeatable; over the YAML's)",
    )
    # the earlier spelling, which other commands' --model (a saved model folder) contradicted: kept, with a warning
    parser.add_argument("--model", action="append", default=[], dest="deprecated_model", help=argparse.SUPPRESS)
    return parser


def parse_arguments(argv: list[str] | None = None) -> TrainingArguments:
    """`--config file.yaml` then `--field value` overrides; `--model_config key=value` sets one model config field."""
    parser = build_parser()
    config = parser.parse_known_args(argv)[0].config  # the file's values become the parser's defaults
    file_values: dict = {}
    if config:
        path = Path(config)
        if not path.is_file():
            parser.error(f"config file not found: {path}")
        file_values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_values, dict):
            parser.error(f"{path}: expected a mapping of field: value, got a {type(file_values).__name__}")
        unknown = set(file_values) - FIELD_NAMES
        if unknown:
            parser.error(f"{path}: unknown field(s) {sorted(unknown)}")
        file_values = _check_file_values(file_values, str(path), parser.error)
    model = dict(file_values.pop("model", None) or {})
    parser.set_defaults(**file_values)
    namespace = vars(parser.parse_args(argv))
    deprecated = namespace.pop("deprecated_model")
    if deprecated:
        logger.warning(
            "train --model KEY=VALUE is now --model_config KEY=VALUE (--model names a saved model folder "
            "in the other commands); the old spelling still works for now"
        )
    for item in deprecated + namespace.pop("model_config"):
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--model_config expects KEY=VALUE, got {item!r}")
        model[key] = _yaml_value(value)
    namespace.pop("config")
    for name, value in namespace.items():  # "none" on the command line clears a field that may be empty
        if (
            isinstance(value, str)
            and value.lower() in ("none", "null")
            and type(None) in typing.get_args(FIELD_HINTS[name])
        ):
            namespace[name] = None
    try:
        return TrainingArguments(**namespace, model=model)
    except ValueError as err:  # a bad value is one line, before any data is read
        parser.error(str(err))
