"""Fill the model card template (`model_card_template.md`, shipped with the package) from a saved model folder.

Every value comes from the folder: `config.json`, `training_args.json`, the training `metrics.json` and the
evaluation results (`eval-*/metrics.json`, as written by `hf-captioner evaluate`). What is missing is said to be missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from string import Template

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE = Path(__file__).resolve().parent / "model_card_template.md"
FIGURES_DIR = "attention"  # attention figures saved with a model (`hf-captioner caption --attention <model>/attention`)
METRIC_NAMES = {
    "bleu_1": "BLEU-1",
    "bleu_2": "BLEU-2",
    "bleu_3": "BLEU-3",
    "bleu_4": "BLEU-4",
    "meteor": "METEOR",
    "rouge_l": "ROUGE-L",
    "cider": "CIDEr-D",
}
HUB_METRIC_TYPES = {"bleu_4": "bleu", "meteor": "meteor", "rouge_l": "rouge", "cider": "cider"}
KNOWN_DATASETS = {"flickr8k": "Flickr8k", "flickr30k": "Flickr30k", "coco": "MS COCO"}  # names for the prose
# The transformers releases a saved folder's code is tested under (tests/test_save_load.py runs one under each): the
# lower bound of pyproject.toml's range and the version constraints.txt pins; that test keeps the three in step.
TESTED_TRANSFORMERS = ("5.23.0", "5.24.0")


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluation_results(model_dir: Path) -> list[dict]:
    """The evaluations written next to the model, test split first, then by beam size."""
    results = [_read_json(path) for path in sorted(model_dir.glob("eval-*/metrics.json"))]
    return sorted(results, key=lambda r: (r.get("split") != "test", r.get("num_beams", 0)))


SAMPLE_NAME = "The hf-captioner sample data set (drawn shapes)"


def dataset_name(data: str, source: str = "local") -> str:
    """The data set's name for the card's prose: the sample set's, a known data set's, else `data` as given."""
    if source == "sample":
        return SAMPLE_NAME
    lowered = data.lower()
    for key, name in KNOWN_DATASETS.items():
        if key in lowered:
            return name
    return data


def recorded_data_source(data: str, training_metrics: dict) -> str:
    """What the run's `--data` was, as the run recorded it (`training.TrainingRun.finish`); judged here for older folders."""
    from .data.loaders import data_source

    return training_metrics.get("data_source") or data_source(data)


def render_model_card(model_dir: str | Path, repo_id: str | None = None, template: str | Path | None = None) -> str:
    model_dir = Path(model_dir)
    config = _read_json(model_dir / "config.json")
    if not config:
        raise FileNotFoundError(f"{model_dir} has no config.json: not a saved captioner folder")
    template_path = Path(template) if template else TEMPLATE
    if not template_path.is_file():
        raise FileNotFoundError(f"Model card template not found: {template_path}")
    args = _read_json(model_dir / "training_args.json")
    training_metrics = _read_json(model_dir / "training_metrics.json")
    evaluations = evaluation_results(model_dir)
    generation = _read_json(model_dir / "generation_config.json")
    repo_id = repo_id or model_dir.name
    data = args.get("data", "")
    source = recorded_data_source(data, training_metrics) if data else "local"
    name = dataset_name(data, source) if data else "not recorded"

    regions = config["grid_size"] ** 2
    architecture = "\n".join(
        [
            f"- Encoder: {_backbone_text(config)}, last feature map average-pooled to {config['grid_size']} x "
            f"{config['grid_size']} = {regions} regions; {_trainable(config['encoder_trainable_stages'])}.",
            *(
                [
                    f"- Region encoder: {config['region_encoder_layers']} Transformer encoder layer(s) over the regions "
                    f"(self-attention among them, {config['hidden_size']}-d, with 2-D grid position embeddings)."
                ]
                if config.get("region_encoder_layers")
                else []
            ),
            f"- Decoder: {_decoder_kind(config)} with {config['hidden_size']} units, {config['embed_dim']}-d word "
            f"embeddings, {config['cross_attention']} cross-attention ({config['attention_dim']}-d) with a sigmoid gate, "
            + (
                "a visual sentinel (the attention may go to the decoder's memory instead of the picture), "
                if config.get("visual_sentinel")
                else ""
            )
            + (
                f"{config['self_attention_heads']}-head self-attention over its earlier states"
                if config["self_attention"]
                else "no self-attention (the classic Show, Attend and Tell decoder)"
            )
            + f", deep output layer, dropout {config['dropout']}.",
            f"- Loss: token cross-entropy (label smoothing {config['label_smoothing']}) + "
            f"{config.get('attention_penalty_form', 'doubly_stochastic').replace('_', ' ')} attention penalty "
            f"(lambda = {config['attention_penalty']})"
            + (
                ", trained with hard (stochastic) attention: each word read one region drawn from its attention weights, "
                "REINFORCE with a moving-average baseline and an entropy bonus (Show, Attend and Tell section 4.1); "
                "captions read the expected context"
                if config.get("hard_attention")
                else ""
            )
            + (
                f", attention supervision from boxes of the named things (lambda = "
                f"{config['attention_supervision_weight']})"
                if config.get("attention_supervision_weight")
                else ""
            )
            + ".",
            f"- Vocabulary: {config['vocab_size']} SentencePiece pieces trained on the training captions.",
        ]
    )
    if args:
        sizes = f" ({args['sample_sizes'][0]} training pictures)" if data == "sample" else ""
        data_text = f"{name}{sizes}, source `{data}`; every caption of a training image is one training example."
    else:
        data_text = "Not recorded (the folder has no training_args.json)."
    training = _training_text(args, training_metrics)
    results = _results_text(evaluations, name)
    return Template(template_path.read_text()).substitute(
        yaml_header=card_data(evaluations, name, data, source, repo_id).to_yaml(),
        title=repo_id.split("/")[-1],
        repo_id=repo_id,
        num_beams=generation.get("num_beams", 3),
        regions=regions,
        architecture=architecture,
        data=data_text,
        training=training,
        results=results,
        data_limits=f"it was trained on {name[0].lower() + name[1:]}" if data else "its training data is not recorded",
        intended_use=SAMPLE_USE if source == "sample" else PHOTO_USE,
        citations=_citations(name),
        attention_figure=_figure_text(model_dir),
        measured_limits=_measured_limits(evaluations),
        saved_with=config.get("transformers_version", "an unrecorded version"),
        tested_transformers=" and ".join(TESTED_TRANSFORMERS),
    )


SAMPLE_USE = (
    "Captioning the drawn pictures of hf-captioner's sample data set (coloured shapes on a plain "
    "background): a model for demonstrating and testing the code. It was never shown a photograph and "
    "does not describe one."
)
PHOTO_USE = (
    "Describing everyday photographs in short English sentences, for research and for learning how "
    "attention-based captioning works; the attention maps show where the model looked for each word."
)


CITATIONS = {  # the paper of the method, and the papers of the data sets a card names
    None: """@inproceedings{xu2015show,
  title     = {Show, Attend and Tell: Neural Image Caption Generation with Visual Attention},
  author    = {Xu, Kelvin and Ba, Jimmy and Kiros, Ryan and Cho, Kyunghyun and Courville, Aaron and
               Salakhudinov, Ruslan and Zemel, Rich and Bengio, Yoshua},
  booktitle = {International Conference on Machine Learning (ICML)},
  year      = {2015}
}""",
    "Flickr8k": """@article{hodosh2013framing,
  title   = {Framing Image Description as a Ranking Task: Data, Models and Evaluation Metrics},
  author  = {Hodosh, Micah and Young, Peter and Hockenmaier, Julia},
  journal = {Journal of Artificial Intelligence Research},
  volume  = {47}, pages = {853--899}, year = {2013}
}""",
    "Flickr30k": """@article{young2014image,
  title   = {From image descriptions to visual denotations: New similarity metrics for semantic inference over
             event descriptions},
  author  = {Young, Peter and Lai, Alice and Hodosh, Micah and Hockenmaier, Julia},
  journal = {Transactions of the Association for Computational Linguistics},
  volume  = {2}, pages = {67--78}, year = {2014}
}""",
}


def _citations(name: str) -> str:
    return "\n".join(CITATIONS[key] for key in (None, name) if key in CITATIONS)


def model_facts(model_dir: str | Path) -> str:
    """A few lines of markdown for the app: what the model was trained on, its best recorded scores and its decoding
    defaults (from the folder's records; a Hub id gets its name only)."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        return f"Model: `{model_dir}`"
    args = _read_json(model_dir / "training_args.json")
    data = args.get("data", "")
    name = dataset_name(data, recorded_data_source(data, _read_json(model_dir / "training_metrics.json")))
    generation = _read_json(model_dir / "generation_config.json")
    lines = [f"**Model** `{model_dir}`, trained on {name if data else 'unrecorded data'}."]
    for evaluation in evaluation_results(model_dir)[:1]:
        scores = ", ".join(
            f"{METRIC_NAMES[k]} {100 * v:.1f}" for k, v in evaluation["metrics"].items() if k in METRIC_NAMES
        )
        lines.append(f"**Scores** ({evaluation['split']} split, {decoding(evaluation)}): {scores}.")
    lines.append(
        f"**Decoding defaults**: {generation.get('num_beams', 1)} beams, at most "
        f"{generation.get('max_new_tokens', '?')} tokens"
        + (
            f", no repeated {generation['no_repeat_ngram_size']}-grams"
            if generation.get("no_repeat_ngram_size")
            else ""
        )
        + "."
    )
    return "\n\n".join(lines)


def _measured_limits(evaluations: list[dict]) -> str:
    """What the evaluations on disk say about the captions' weak spots."""
    lines = []
    for e in evaluations:
        where = f"{e['split']} split, {decoding(e)}"
        if "repetition" in e:
            lines.append(
                f"- {100 * e['repetition']['repeated_bigram_rate']:.1f}% of its captions repeat a word "
                f"bigram ({where})."
            )
        attention = e.get("attention", {})
        if attention.get("normalised_entropy") is not None:
            lines.append(
                f"- The normalised entropy of its attention maps is {attention['normalised_entropy']:.2f} "
                f"(1 = spread evenly over the regions), {where}: the closer to 1, the rougher the maps "
                "are as a pointer."
            )
        if lines:
            break
    return "\n".join(lines) if lines else "- Not measured yet: run `hf-captioner evaluate` on this folder."


def attention_figures(model_dir: Path) -> list[Path]:
    return sorted((model_dir / FIGURES_DIR).glob("*.png"))


def _figure_text(model_dir: Path) -> str:
    figures = attention_figures(model_dir)
    if not figures:
        return ""
    return (
        f"![Where the model looked for each word]({FIGURES_DIR}/{figures[0].name})\n\nWhere the model looked "
        "while writing each word of its caption (one panel per word; `hf-captioner caption --attention`).\n"
    )


def _decoder_kind(config: dict) -> str:
    """The recurrent decoder in words: one cell (Show, Attend and Tell) or the top-down pair."""
    cell = config["rnn_type"].upper()
    if config.get("decoder_type") == "top_down":
        return f"top-down {cell} pair (an attention {cell} queries the regions, a language {cell} predicts the word)"
    return cell


def _backbone_text(config: dict) -> str:
    from .backbones import NATIVE_OUTPUT_STRIDE  # here: backbones imports torch, which `--help` must not

    if config.get("vision_backbone"):  # a timm / torchvision network: its name says it all
        stride = config.get("vision_output_stride", NATIVE_OUTPUT_STRIDE)
        dilated = f" at output stride {stride} (last stage dilated)" if stride != NATIVE_OUTPUT_STRIDE else ""
        return f"`{config['vision_backbone']}`{dilated}"
    vision = config.get("vision_config", {})
    return (
        f"{vision.get('model_type', '?')} backbone (stages {vision.get('depths', '?')}, widths "
        f"{vision.get('hidden_sizes', '?')})"
    )


def _trainable(stages: int) -> str:
    return {0: "frozen", -1: "fine-tuned entirely"}.get(stages, f"last {stages} stage(s) fine-tuned")


def _training_text(args: dict, metrics: dict) -> str:
    if not args:
        return "Not recorded."
    if args.get("max_train_steps"):
        length = f"At most {args['max_train_steps']} optimizer steps (max_train_steps)"
    else:
        length = f"{args['num_epochs']} epochs at most"
    if metrics.get("history"):
        length += f"; it ran {metrics['steps']} steps, {metrics['history'][-1]['epoch']} epoch(s)"
    lines = [
        f"- {length}, batch {args['batch_size']} per process, AdamW, learning rate "
        f"{args['learning_rate']} (encoder {args['encoder_learning_rate']}), {args['lr_scheduler']} schedule with "
        f"{args['warmup_steps']} warm-up steps, gradient clipping at {args['max_grad_norm']}, "
        f"mixed precision: {args['mixed_precision']}, seed {args['seed']}.",
        f"- Early stopping on validation CIDEr-D (patience {args['early_stopping_patience']} epochs); the best "
        "epoch's weights are the ones published.",
    ]
    if args.get("objective") == "self_critical":
        lines.insert(
            0,
            f"- Self-critical sequence training: {args['self_critical_samples']} captions sampled per "
            "image, each rewarded with its CIDEr-D against the image's references, baseline the mean "
            "reward of the other samples.",
        )
    else:
        lines.insert(0, "- Cross-entropy on the reference captions (teacher forcing).")
    if args.get("init_from"):
        lines.insert(0, f"- Started from the captioner `{args['init_from']}`.")
    processes = metrics.get("num_processes", 1)
    command = (
        "hf-captioner train"
        if processes == 1
        else f"accelerate launch --num_processes {processes} -m hf_captioner.commands.train"
    )
    lines.append(
        f"- To reproduce: `{command} --config training_args.json` (the file in this repository holds every "
        "setting of the run; the data and output paths are the original machine's)."
    )
    if metrics.get("best"):
        best = metrics["best"]
        lines.append(
            f"- Best validation epoch {best['epoch']} (step {best['step']}): CIDEr-D {100 * best['cider']:.1f}, "
            f"BLEU-4 {100 * best['bleu_4']:.1f}, validation loss {best['val_loss']:.3f}."
        )
    return "\n".join(lines)


def _results_text(evaluations: list[dict], name: str) -> str:
    if not evaluations:
        return "No evaluation recorded yet: run `hf-captioner evaluate` on this folder and render the card again."
    keys = [k for k in METRIC_NAMES if any(k in e["metrics"] for e in evaluations)]
    lines = [
        "| data | split | images | decoding | " + " | ".join(METRIC_NAMES[k] for k in keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for e in evaluations:
        values = " | ".join(f"{100 * e['metrics'][k]:.1f}" if k in e["metrics"] else "n/a" for k in keys)
        lines.append(f"| {name} | {e['split']} | {e['images']} | {decoding(e)} | {values} |")
    for e in evaluations:
        if e.get("attention", {}).get("pointing_nouns"):
            a = e["attention"]
            lines.append(
                f"\nAttention: while a word that names a boxed thing is emitted, the most-attended region "
                f"lies inside its box in {100 * a['pointing_accuracy']:.1f}% of {a['pointing_nouns']} cases "
                f"(chance {100 * a['pointing_chance']:.1f}%), {e['split']} split, {decoding(e)}."
            )
            break
    return "\n".join(lines)


# the pipeline task that captions with this model (transformers 5 sends "image-to-text" to it as well)
PIPELINE_TASK = "image-text-to-text"


def decoding(evaluation: dict) -> str:
    """How an evaluation's captions were decoded: the beams, and any generate() option it set."""
    options = "".join(f", {k} {v}" for k, v in sorted(evaluation.get("generate_kwargs", {}).items()))
    return f"{evaluation['num_beams']} beams{options}"


def card_data(evaluations: list[dict], name: str, data: str, source: str, repo_id: str) -> ModelCardData:
    """The card's metadata, built and checked by huggingface_hub: Hub data set ids only for data that came from the
    Hub (`source`, see `recorded_data_source`; local data is named in the card's prose), one model-index result per
    evaluation (split and beam size), under the repository's name."""
    hub_dataset = data if data and source == "hub" else None
    results = [
        EvalResult(
            task_type=PIPELINE_TASK,
            task_name="Image captioning",
            dataset_type=hub_dataset or "local",
            dataset_name=name,
            dataset_split=e["split"],
            metric_type=HUB_METRIC_TYPES[key],
            metric_name=f"{METRIC_NAMES[key]} ({decoding(e)})",
            metric_value=round(100 * e["metrics"][key], 2),
        )
        for e in evaluations
        for key in HUB_METRIC_TYPES
        if key in e["metrics"]
    ]
    return ModelCardData(
        language="en",
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=PIPELINE_TASK,
        tags=["image-captioning", "show-attend-and-tell", "attention", "custom_code", "hf-captioner"],
        datasets=[hub_dataset] if hub_dataset else None,
        metrics=["bleu", "meteor", "rouge", "cider"],
        model_name=repo_id.split("/")[-1] if results else None,
        eval_results=results or None,
    )


def check_model_card(path: str | Path) -> ModelCard:
    """Load a written card as the Hub reads it (huggingface_hub parses its metadata and model-index), offline:
    a ValueError names what does not parse. `ModelCard.validate` does the Hub's own check, but online."""
    card = ModelCard.load(path)
    if card.data.pipeline_tag != PIPELINE_TASK or card.data.library_name != "transformers":
        raise ValueError(f"{path}: pipeline_tag / library_name are not {PIPELINE_TASK} / transformers")
    return card


def write_model_card(model_dir: str | Path, repo_id: str | None = None, output: str | Path | None = None) -> Path:
    """Render the card and write it as README.md (the Hub's model card) into `output` (default: the model folder)."""
    path = Path(output or model_dir) / "README.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_model_card(model_dir, repo_id))
    return path
