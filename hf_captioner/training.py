"""Training with Accelerate: arguments, data, the loop, validation with caption scores, checkpoints and resume.

Run it as `hf-captioner train --config configs/X.yaml [--field value ...]`; on several processes
`accelerate launch -m hf_captioner.commands.train --config ...`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.image_utils import PILImageResampling

from .arguments import SettingsError, TrainingArguments, parse_arguments
from .attention_measures import ENTITIES_FILE, find_entities_file, load_flickr30k_entities
from .backbones import image_settings, is_backbone_name
from .configuration_captioner import CaptionerConfig
from .data.feature_store import encode_split, stored_input
from .data.grounding import GroundedCaptions, entity_phrases, shape_phrases
from .data.loaders import DataError, data_source, detect_and_load, hub_layout
from .data.pairs import (
    CaptionCollator,
    CaptionedImages,
    CaptionPairs,
    EpochShuffleSampler,
    ImageCollator,
)
from .data.sample import make_sample_dataset
from .inference import bf16_pays, generate_captions, validation_loss, warn_if_bf16_is_slow
from .metrics import score_captions
from .modeling_captioner import CaptionerForConditionalGeneration
from .processing_captioner import CaptionerImageProcessor, CaptionerProcessor
from .self_critical import SelfCriticalObjective
from .tokenization import train_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """Where a run stands: saved with every checkpoint (as JSON) and restored on resume."""

    global_step: int = 0  # optimizer steps taken
    epoch: int = 0  # epochs completed
    batches_in_epoch: int = 0  # batches of the current epoch already seen (> 0 when resuming mid-epoch)
    best_cider: float | None = None  # best validation CIDEr-D so far
    bad_epochs: int = 0  # validations since the best one (early stopping)
    history: list[dict] = field(default_factory=list)  # one record per validation
    log_history: list[dict] = field(default_factory=list)  # the logged training values, every log_every_steps

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> TrainerState:
        return cls(**json.loads(text))  # older checkpoints lack log_history: its default


# ----------------------------------------------------------------------------------------------------------------
# data, processor, model


def load_data(args: TrainingArguments):
    """The run's `DatasetDict` (train / validation / test), trimmed to the requested sizes."""
    if args.data == "sample":
        n_train, n_val, n_test = args.sample_sizes
        # its `objects` (the drawn shapes and their boxes) stay: attention supervision reads them
        data = make_sample_dataset(n_train, n_val, n_test, seed=args.sample_seed, image_size=args.sample_image_size)
    else:
        layout = hub_layout(args.data, vars(args))
        data = detect_and_load(args.data, images_dir=args.images_dir, strict=args.strict, layout=layout)
    if args.max_train_images:
        data["train"] = data["train"].select(range(min(args.max_train_images, len(data["train"]))))
    if args.max_eval_images:
        data["validation"] = data["validation"].select(range(min(args.max_eval_images, len(data["validation"]))))
    for split in ("train", "validation"):
        if len(data[split]) == 0:
            raise DataError(f"The {split} split of {args.data!r} is empty")
    return data


def build_processor(args: TrainingArguments, train_captions: list[list[str]]) -> CaptionerProcessor:
    """Image processor with the backbone's own values at the run's image size + a tokenizer trained on the train
    captions (or the processor saved at `processor_path`)."""
    if args.processor_path:
        return CaptionerProcessor.from_pretrained(args.processor_path)
    tokenizer = train_tokenizer(
        [c for captions in train_captions for c in captions], args.vocab_size, args.tokenizer_model_type
    )
    named = args.vision_pretrained if is_backbone_name(args.vision_pretrained) else args.model.get("vision_backbone")
    settings = image_settings(named)
    resample = {"bilinear": PILImageResampling.BILINEAR, "bicubic": PILImageResampling.BICUBIC}
    image_processor = CaptionerImageProcessor(
        size={"shortest_edge": args.resize_size or round(args.image_size / settings["crop_pct"])},
        crop_size={"height": args.image_size, "width": args.image_size},
        image_mean=list(settings["mean"]),
        image_std=list(settings["std"]),
        resample=resample.get(settings["interpolation"], PILImageResampling.BICUBIC),
    )
    return CaptionerProcessor(image_processor, tokenizer)


def build_model(args: TrainingArguments, processor: CaptionerProcessor) -> CaptionerForConditionalGeneration:
    model = _build_model(args, processor)
    if args.no_repeat_ngram_size:
        model.generation_config.no_repeat_ngram_size = args.no_repeat_ngram_size
    return model


def _build_model(args: TrainingArguments, processor: CaptionerProcessor) -> CaptionerForConditionalGeneration:
    tokenizer = processor.tokenizer
    special = dict(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        unk_token_id=tokenizer.unk_token_id,
        decoder_start_token_id=tokenizer.bos_token_id,
    )
    if args.init_from:
        model = CaptionerForConditionalGeneration.from_pretrained(args.init_from, **args.model)
        mismatched = {k: v for k, v in special.items() if getattr(model.config, k) != v}
        if mismatched:
            raise ValueError(f"{args.init_from} does not match the tokenizer: {mismatched}; pass its processor_path")
        return model
    if args.vision_pretrained:
        vision_kwargs = {"checkpoint_path": args.vision_checkpoint} if args.vision_checkpoint else None
        return CaptionerForConditionalGeneration.from_vision_pretrained(
            args.vision_pretrained, vision_kwargs=vision_kwargs, **special, **args.model
        )
    return CaptionerForConditionalGeneration(CaptionerConfig(**special, **args.model))


def build_optimizer(model: CaptionerForConditionalGeneration, args: TrainingArguments) -> torch.optim.AdamW:
    """AdamW over the trainable parameters: the decoder at `learning_rate`, fine-tuned encoder stages at
    `encoder_learning_rate`. The fused kernel: the default per-tensor loop costs a large share of a CPU training step
    (docs/performance.md)."""
    encoder_params = [p for p in model.encoder.parameters() if p.requires_grad]
    decoder_params = [p for p in model.decoder.parameters() if p.requires_grad]
    groups = [{"params": decoder_params, "lr": args.learning_rate}]
    if encoder_params:
        groups.append({"params": encoder_params, "lr": args.encoder_learning_rate})
    return torch.optim.AdamW(groups, weight_decay=args.weight_decay, fused=True)


# ----------------------------------------------------------------------------------------------------------------
# checkpoints


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder is complete once renamed from its temporary name)."""
    folder = output_dir / "checkpoints"
    found = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def resolve_checkpoint(output_dir: Path, requested: str) -> Path:
    if requested == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no checkpoint under {output_dir / 'checkpoints'}"
            )
        return checkpoints[-1]
    path = Path(requested)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE})")
    return path


TRACKER_PROJECT = "hf_captioner"  # the trackers' (TensorBoard's) folder under output_dir
RUN_OUTPUTS = ("training_args.json", "metrics.json", "checkpoints", "best", "final", "processor", TRACKER_PROJECT)


def claim_output_dir(args: TrainingArguments, remove: bool) -> None:
    """A new run needs an output_dir of its own: another run's checkpoints would sort among (and prune) its own, and
    `--resume_from_checkpoint latest` would later pick the wrong run. Refused unless the user asks to resume or to
    overwrite; overwriting removes the old run's outputs first (where `remove`: the main process)."""
    output_dir = Path(args.output_dir)
    previous = [name for name in RUN_OUTPUTS if (output_dir / name).exists()]
    if not previous or args.resume_from_checkpoint:
        return
    if not args.overwrite_output_dir:
        raise FileExistsError(
            f"output_dir {output_dir} holds another run ({', '.join(previous)}): pass --resume_from_checkpoint latest "
            "to continue it, --overwrite_output_dir to replace it, or choose another output_dir"
        )
    if remove:
        for name in previous:
            path = output_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        logger.info("Removed the previous run's outputs from %s (--overwrite_output_dir)", output_dir)


def owes_validation(state: TrainerState) -> bool:
    """Whether steps were trained since the last validation (a resumed run must not skip the final one)."""
    return state.global_step > (state.history[-1]["step"] if state.history else 0)


def replace_folder(target: Path, write: typing.Callable[[Path], None]) -> None:
    """Write a folder so that a kill at any moment leaves the old complete one or the new complete one: the new one
    is written aside, then swapped in by renames; `recover_folder` finishes or undoes an interrupted swap."""
    partial, old = _aside(target)
    shutil.rmtree(partial, ignore_errors=True)
    write(partial)
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(partial, target)  # a kill just before this leaves `old`, which recover_folder puts back
    shutil.rmtree(old, ignore_errors=True)


def _aside(target: Path) -> tuple[Path, Path]:
    """Where `replace_folder` writes the new folder and parks the old one."""
    return target.with_name(f".partial-{target.name}"), target.with_name(f".old-{target.name}")


def recover_folder(target: Path) -> None:
    """After a kill during `replace_folder`: put the old complete folder back (the resumed run redoes the write)."""
    partial, old = _aside(target)
    if not target.exists() and old.exists():
        os.replace(old, target)
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(accelerator: Accelerator, output_dir: Path, state: TrainerState, keep: int) -> None:
    """Write to a temporary folder, then rename: a kill during the save never destroys the last good checkpoint."""
    folder = output_dir / "checkpoints"
    final = folder / f"{CHECKPOINT_PREFIX}{state.global_step}"
    partial = folder / f".partial-{CHECKPOINT_PREFIX}{state.global_step}"
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(state.to_json())
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------------------------
# the run


def _has_accelerator_device() -> bool:
    """Whether a GPU-like device is here. Without one, Accelerate must be told: CPU workers started by torchrun
    then join one gloo group (MULTI_CPU) instead of each training alone on the whole data."""
    xpu = getattr(torch, "xpu", None)
    return torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())


def _trackers(report_to: str) -> str | None:
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return "tensorboard"
    return report_to


def _scalars(args: TrainingArguments) -> dict:
    """Arguments as tracker hyper-parameters (scalars only)."""
    flat = {k: v for k, v in dataclasses.asdict(args).items() if k != "model"}
    flat.update({f"model.{k}": v for k, v in args.model.items()})
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def train(args: TrainingArguments) -> dict:
    """Train, validate each epoch, stop early on CIDEr, and save the best model + processor to output_dir/final.

    Returns the run's metrics (also written to output_dir/metrics.json).
    """
    run = TrainingRun.set_up(args)
    run.train()
    return run.finish()


@dataclass
class TrainingRun:
    """One run, from its set-up to its final folder: what the loop reads (the prepared model, optimizer, schedule and
    loaders), what it writes (`state`, checkpoints, best/), and how far it goes (`total_steps`, `num_epochs`).

    `set_up` builds it in the order that fixes the random streams (seed, tokenizer, seed again, model, features,
    loaders, optimizer, resume); `train` runs the epochs; `finish` writes metrics.json and final/.
    """

    args: TrainingArguments
    accelerator: Accelerator
    data: typing.Any  # the DatasetDict
    processor: CaptionerProcessor
    model: torch.nn.Module  # prepared by Accelerate
    objective: typing.Callable
    optimizer: torch.optim.Optimizer
    scheduler: typing.Any
    train_loader: DataLoader
    val_loader: DataLoader
    val_features: typing.Any  # the validation split's FeatureStore, or None
    total_steps: int
    num_epochs: int
    state: TrainerState = field(default_factory=TrainerState)
    progress: typing.Any = None
    started: float = 0.0
    last_log: tuple[float, int] = (0.0, 0)  # (time, step) of the last log: the training rate between logs
    grad_norms: list[float] = field(default_factory=list)  # each optimizer step's gradient norm since the last log

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)

    @classmethod
    def set_up(cls, args: TrainingArguments) -> TrainingRun:
        accelerator = Accelerator(
            cpu=not _has_accelerator_device(),
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            mixed_precision=_mixed_precision(args.mixed_precision),
            log_with=_trackers(args.report_to),
            project_dir=str(Path(args.output_dir)),
        )
        if accelerator.mixed_precision == "bf16":
            warn_if_bf16_is_slow(accelerator.device)
        set_seed(args.seed)
        checkpoint = _claim_run_folder(args, accelerator)
        data = load_data(args)
        processor = _run_processor(args, accelerator, data)
        set_seed(args.seed)  # the model's initial weights do not depend on how the tokenizer was obtained
        model = _run_model(args, processor)
        objective = cross_entropy
        if args.objective == "self_critical":  # built before any feature caching, so that a bad setting fails at once
            objective = SelfCriticalObjective(
                processor, data["train"]["captions"], args.self_critical_samples, args.self_critical_max_new_tokens
            )
        grounding = _run_grounding(args, model, processor, data["train"])  # before caching: missing boxes fail at once
        train_features, val_features = _run_features(args, accelerator, model, processor, data)
        train_loader, val_loader = _run_loaders(args, processor, data, train_features, val_features, grounding)
        optimizer = build_optimizer(model, args)
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
        steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
        total_steps = args.max_train_steps or steps_per_epoch * args.num_epochs
        # A prepared scheduler is stepped once per process at every optimizer step (Accelerate counts per-process
        # batches): the schedule is laid out in those units, so the rate at step k is the one-process run's.
        processes = accelerator.num_processes
        scheduler = get_scheduler(args.lr_scheduler, optimizer, args.warmup_steps * processes, total_steps * processes)
        scheduler = accelerator.prepare(scheduler)
        accelerator.init_trackers(TRACKER_PROJECT, config=_scalars(args))
        run = cls(
            args,
            accelerator,
            data,
            processor,
            model,
            objective,
            optimizer,
            scheduler,
            train_loader,
            val_loader,
            val_features,
            total_steps,
            math.ceil(total_steps / steps_per_epoch),
        )
        if checkpoint is not None:
            run.resume(checkpoint)
        return run

    def resume(self, checkpoint: Path) -> None:
        """The prepared objects' states and the trainer state of `checkpoint`."""
        before = torch.get_rng_state()
        self.accelerator.load_state(str(checkpoint))
        if torch.equal(before, torch.get_rng_state()):  # Accelerate only logs this at INFO and goes on
            logger.warning(
                "%s: the random number state (random_states_*.pkl) could not be restored: the resumed "
                "run will not repeat the uninterrupted one exactly",
                checkpoint,
            )
        self.state = TrainerState.from_json((checkpoint / STATE_FILE).read_text())
        logger.info("Resumed from %s at step %d (epoch %d)", checkpoint, self.state.global_step, self.state.epoch)

    def train(self) -> None:
        """Epochs until the step budget is spent or early stopping: each ends with a validation and a checkpoint. A
        run killed after its last step's checkpoint but before that step's validation still owes the validation."""
        state, stop = self.state, False
        self.progress = tqdm(
            total=self.total_steps,
            initial=state.global_step,
            desc="Training",
            disable=not self.accelerator.is_local_main_process,
        )
        self.started = time.perf_counter()
        self.last_log = (self.started, state.global_step)
        while not stop and (
            state.epoch < self.num_epochs and state.global_step < self.total_steps or owes_validation(state)
        ):
            self.run_epoch()
            if state.batches_in_epoch >= len(self.train_loader):  # the epoch ran to its end
                state.epoch += 1
                state.batches_in_epoch = 0
            if state.batches_in_epoch == 0 or state.global_step >= self.total_steps:
                stop = self.validate()
                save_checkpoint(self.accelerator, self.output_dir, state, self.args.keep_checkpoints)
        self.progress.close()

    def run_epoch(self) -> None:
        """The rest of the current epoch (all of it, or what a resumed run had not done), up to the step budget."""
        self.model.train()
        state = self.state
        skip = state.batches_in_epoch  # > 0 when resuming mid-epoch
        batches = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
        batches.set_epoch(state.epoch)  # the sampler's permutation depends on the epoch only
        for batch in batches if state.global_step < self.total_steps else ():
            logs = self.train_step(batch)
            state.batches_in_epoch += 1
            if not self.accelerator.sync_gradients:
                continue
            state.global_step += 1
            self.progress.update(1)
            if state.global_step % self.args.log_every_steps == 0:
                if self.objective is cross_entropy and self.accelerator.unwrap_model(self.model).config.hard_attention:
                    logs |= hard_attention_gradient_norms(self.accelerator.unwrap_model(self.model), batch)
                self.log(logs)
            if self.args.checkpoint_every_steps and state.global_step % self.args.checkpoint_every_steps == 0:
                save_checkpoint(self.accelerator, self.output_dir, state, self.args.keep_checkpoints)
            if state.global_step >= self.total_steps:
                break

    def train_step(self, batch: dict) -> dict:
        """One batch: the objective's loss backward, and at an optimizer step clipping, the update and the schedule."""
        accelerator, args = self.accelerator, self.args
        with accelerator.accumulate(self.model):
            loss, logs = self.objective(self.model, batch, accelerator.unwrap_model(self.model))
            accelerator.backward(loss)
            if accelerator.sync_gradients:  # the norm is logged; infinite: measured, not clipped
                norm = accelerator.clip_grad_norm_(self.model.parameters(), args.max_grad_norm or math.inf)
                if norm is not None:
                    self.grad_norms.append(float(norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        return logs

    def log(self, logs: dict) -> None:
        """The step's logs (made floats), the rate and the learning rate, to the trackers, the bar and the history."""
        state = self.state
        logs = {name: float(value) for name, value in logs.items()} | {"lr": self.scheduler.get_last_lr()[0]}
        if self.grad_norms:  # before clipping; the share of steps clipped at max_grad_norm
            logs["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
            if self.args.max_grad_norm:
                clipped = sum(norm > self.args.max_grad_norm for norm in self.grad_norms)
                logs["train/clipped_share"] = clipped / len(self.grad_norms)
            self.grad_norms.clear()
        # all processes' captions (images, self-critical) per second since the last log
        now, steps = time.perf_counter(), state.global_step - self.last_log[1]
        examples = steps * self.train_loader.total_batch_size * self.args.gradient_accumulation_steps
        logs["train/examples_per_second"] = examples / (now - self.last_log[0])
        self.last_log = (now, state.global_step)
        self.progress.set_postfix({name.split("/")[-1]: f"{logs[name]:.3f}" for name in PROGRESS_LOGS if name in logs})
        self.accelerator.log(logs, step=state.global_step)
        state.log_history.append({"step": state.global_step, **logs})

    def validate(self) -> bool:
        """Validation loss and caption scores; keep the best model; return whether to stop early."""
        args, accelerator, state = self.args, self.accelerator, self.state
        validation = self.data["validation"]
        captions = generate_captions(
            self.model,
            self.processor,
            validation,
            accelerator,
            features=self.val_features,
            batch_size=args.eval_batch_size,
            num_beams=args.eval_num_beams,
            max_new_tokens=args.eval_max_new_tokens,
        )
        scores = score_captions(captions, validation["captions"], meteor=False)  # METEOR (Java) is for final scores
        record = {
            "epoch": state.epoch,
            "step": state.global_step,
            "val_loss": validation_loss(self.model, self.val_loader, accelerator),
            **scores,
        }
        state.history.append(record)
        accelerator.log(
            {f"val/{k}": v for k, v in record.items() if k not in ("epoch", "step")}, step=state.global_step
        )
        logger.info(
            "epoch %d step %d: val loss %.4f, BLEU-4 %.4f, CIDEr %.4f",
            record["epoch"],
            record["step"],
            record["val_loss"],
            record["bleu_4"],
            record["cider"],
        )
        if state.best_cider is None or record["cider"] > state.best_cider:
            state.best_cider, state.bad_epochs = record["cider"], 0
            if accelerator.is_main_process:

                def write_best(folder: Path) -> None:
                    accelerator.unwrap_model(self.model).save_pretrained(folder)
                    self.processor.save_pretrained(folder)

                replace_folder(self.output_dir / "best", write_best)
            accelerator.wait_for_everyone()
        else:
            state.bad_epochs += 1
        return bool(args.early_stopping_patience) and state.bad_epochs >= args.early_stopping_patience

    def finish(self) -> dict:
        """metrics.json and final/ (the best model, its processor and the run's records); the run's metrics.
        `data_source` records what `--data` was here (the model card, rendered elsewhere, could not tell a relative
        path from a Hub id)."""
        accelerator, output_dir, state = self.accelerator, self.output_dir, self.state
        best = max(state.history, key=lambda h: h["cider"])
        metrics = {
            "best": best,
            "history": state.history,
            "log_history": state.log_history,
            "steps": state.global_step,
            "num_processes": accelerator.num_processes,
            "train_seconds_this_session": round(time.perf_counter() - self.started, 1),
            "data_source": data_source(self.args.data),
        }
        if not (output_dir / "best" / "model.safetensors").is_file():  # every process stops, none waits for the others
            raise RuntimeError(f"{output_dir / 'best'} holds no complete model: final/ was not written")
        if accelerator.is_main_process:
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))

            def write_final(folder: Path) -> None:
                shutil.copytree(output_dir / "best", folder)
                # the run's settings, as the model card's "to reproduce" line uses them: a resume is not one of them
                settings = json.loads((output_dir / "training_args.json").read_text())
                (folder / "training_args.json").write_text(
                    json.dumps({**settings, "resume_from_checkpoint": None}, indent=2)
                )
                shutil.copy(output_dir / "metrics.json", folder / "training_metrics.json")  # travels with the model

            replace_folder(output_dir / "final", write_final)
            logger.info(
                "Best validation CIDEr %.3f at epoch %d; model saved to %s",
                best["cider"],
                best["epoch"],
                output_dir / "final",
            )
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return metrics


def _mixed_precision(asked: str) -> str:
    """What Accelerate is given: "auto" becomes bf16 where `bf16_pays` on the device the run will use, else "no"."""
    if asked != "auto":
        return asked
    device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = "bf16" if bf16_pays(device) else "no"
    logger.info("mixed_precision auto: %s on this %s (a probe of its bf16 and float32 products)", chosen, device)
    return chosen


def _claim_run_folder(args: TrainingArguments, accelerator: Accelerator) -> Path | None:
    """Check the output folder (every process, before anything is written), repair an interrupted swap of best/ or
    final/, record the settings; the checkpoint to resume from, or None. A missing checkpoint is said now, not after
    the data and model are built."""
    output_dir = Path(args.output_dir)
    claim_output_dir(args, remove=accelerator.is_main_process)
    checkpoint = resolve_checkpoint(output_dir, args.resume_from_checkpoint) if args.resume_from_checkpoint else None
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for folder in ("best", "final"):
            recover_folder(output_dir / folder)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "training_args.json").write_text(json.dumps(dataclasses.asdict(args), indent=2))
    return checkpoint


def _run_processor(args: TrainingArguments, accelerator: Accelerator, data) -> CaptionerProcessor:
    """The main process trains the tokenizer (or, resuming, reuses the run's); the others load it."""
    processor_dir = Path(args.output_dir) / "processor"
    with accelerator.main_process_first():
        if accelerator.is_main_process and not (args.resume_from_checkpoint and processor_dir.is_dir()):
            processor = build_processor(args, data["train"]["captions"])
            processor.save_pretrained(processor_dir)
        else:
            processor = CaptionerProcessor.from_pretrained(processor_dir)
    return processor


def _run_model(args: TrainingArguments, processor: CaptionerProcessor) -> CaptionerForConditionalGeneration:
    """The captioner of the run; what only the built backbone can refuse is a SettingsError (one line)."""
    try:
        model = build_model(args, processor)
        if args.cache_features:
            stored_input(model)  # an encoder with nothing to cache stops here, in every process, before any barrier
    except ValueError as err:
        raise SettingsError(str(err)) from err
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    logger.info(
        "Model: %.2fM parameters (%.2fM trainable)",
        model.num_parameters() / 1e6,
        model.num_parameters(only_trainable=True) / 1e6,
    )
    return model


def _run_features(args: TrainingArguments, accelerator: Accelerator, model, processor, data):
    """The train and validation feature stores (`cache_features`: made once, the main process first), or Nones."""
    if not args.cache_features:
        return None, None
    precision = args.feature_cache_precision
    if precision == "auto":
        precision = "bf16" if _mixed_precision("auto") == "bf16" else "float32"
    with accelerator.main_process_first():
        model.to(accelerator.device)
        return tuple(
            encode_split(
                model,
                processor,
                data[split],
                args.feature_cache_dir,
                args.eval_batch_size,
                args.feature_cache_dtype,
                precision=precision,
            )
            for split in ("train", "validation")
        )


def _run_grounding(args: TrainingArguments, model, processor, train_data) -> GroundedCaptions | None:
    """The train captions' attention targets when the model is supervised (`attention_supervision_weight` > 0):
    from the sample set's shapes, or from Flickr30k Entities (`--entities`, else the data folder's
    flickr30k_entities.json, as evaluation finds it). None when the model is not supervised."""
    if not model.config.attention_supervision_weight or args.objective != "cross_entropy":
        return None
    if "objects" in train_data.column_names:
        objects = train_data["objects"]

        def phrases_of(row, size):
            return shape_phrases(objects[row], size)

    else:
        path = find_entities_file(args.data, args.entities)
        if path is None:
            raise SettingsError(
                "attention_supervision_weight > 0 needs boxes: pass --entities FILE (Flickr30k Entities "
                f"annotations; found by itself as {ENTITIES_FILE} in the --data folder), or train on the sample data"
            )
        try:
            entities = load_flickr30k_entities(path)
        except ValueError as err:
            raise SettingsError(str(err)) from err
        image_ids = train_data["image_id"]

        def phrases_of(row, size):
            entry = entities.get(image_ids[row])
            return entity_phrases(entry) if entry is not None else []

    return GroundedCaptions(train_data, processor, phrases_of, model.config.grid_size, args.max_caption_tokens)


def _run_loaders(args: TrainingArguments, processor, data, train_features, val_features, grounding=None):
    """The train loader (caption pairs, or images for self-critical training; shuffled per epoch by the seed) and
    the validation loader, reading cached features where there are some; `grounding` adds the train captions'
    attention targets."""
    collator = CaptionCollator(processor, args.max_caption_tokens)
    groups = None  # shuffled as units, when they are
    if args.objective == "self_critical":  # one example per image, rewarded against all its references
        train_set, train_collator = CaptionedImages(data["train"], train_features), ImageCollator(processor)
    else:  # one example per (image, caption) pair
        train_collator = CaptionCollator(processor, args.max_caption_tokens, grounding)
        train_set = CaptionPairs(data["train"], train_features)
        groups = train_set.captions_per_image if args.group_captions_by_image else None
    train_loader = DataLoader(
        train_set,
        batch_size=args.batch_size,
        sampler=EpochShuffleSampler(len(train_set), args.seed, groups),
        collate_fn=train_collator,
        num_workers=args.num_workers,
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds drawn here, not from the global RNG
    )
    val_loader = DataLoader(
        CaptionPairs(data["validation"], val_features), batch_size=args.eval_batch_size, collate_fn=collator
    )
    return train_loader, val_loader


def cross_entropy(model, batch: dict, unwrapped=None) -> tuple[torch.Tensor, dict]:
    """Teacher forcing on reference captions: (loss, logs); the logs stay tensors until they are logged."""
    outputs = model(**batch)
    logs = {
        "train/loss": outputs.loss.detach(),
        "train/token_loss": outputs.token_loss.detach(),
        "train/attention_loss": outputs.attention_loss.detach(),
        "train/supervision_loss": outputs.supervision_loss.detach(),
    }
    model = unwrapped if unwrapped is not None else model
    if getattr(model, "hard_attention_stats", None):  # this batch sampled its regions (hard attention)
        logs |= {f"train/hard_attention/{name}": value for name, value in model.hard_attention_stats.items()}
    return outputs.loss, logs


def hard_attention_gradient_norms(model, batch: dict) -> dict:
    """The gradient norms of hard attention's two parts on a batch with its regions drawn, taken apart (the training
    step sees only their sum): the token loss's and the policy term's (REINFORCE and the entropy bonus; the
    attention penalty left out). Run at log steps on the reference decoder (the packed one backs up once); the
    model's moving averages are put back, so the look changes the run only by the random numbers it draws."""
    saved = (model.reward_baseline, model.advantage_variance, model.hard_attention_stats)
    implementation, model.config.decoder_implementation = model.config.decoder_implementation, "reference"
    try:
        outputs = model(**batch, sample_regions=True, output_attentions=True, use_cache=False)
        penalty = model.attention_penalty(outputs.cross_attentions, model.repeat_for_draws(batch["labels"]) != -100)
        params = [p for p in model.parameters() if p.requires_grad]
        norms = {}
        for name, part in (("token_loss", outputs.token_loss), ("policy", outputs.attention_loss - penalty)):
            grads = torch.autograd.grad(part, params, retain_graph=True, allow_unused=True)
            norms[f"train/hard_attention/{name}_grad_norm"] = torch.cat(
                [g.detach().float().flatten() for g in grads if g is not None]
            ).norm()
    finally:
        model.config.decoder_implementation = implementation
        model.reward_baseline, model.advantage_variance, model.hard_attention_stats = saved
    return norms


PROGRESS_LOGS = ("train/token_loss", "train/reward")  # shown on the progress bar


__all__ = ["TrainingArguments", "parse_arguments", "train"]
