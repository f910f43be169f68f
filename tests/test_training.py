"""Training: arguments, a short run that learns, exact resume, multi-process launch, cached features."""

import dataclasses
import itertools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_VISION, tiny_arguments
from safetensors.torch import load_file
from transformers import AutoModel, AutoProcessor

from hf_captioner import CaptionerConfig, CaptionerForConditionalGeneration, training
from hf_captioner.arguments import parse_arguments
from hf_captioner.commands import train as train_command
from hf_captioner.data.feature_store import FeatureStore, encode_split, feature_cache_key
from hf_captioner.data.pairs import CaptionCollator, CaptionPairs
from hf_captioner.inference import generate_captions
from hf_captioner.training import build_model, build_processor, load_data, train

REPO = Path(__file__).resolve().parents[1]


def test_arguments_come_from_yaml_then_the_command_line(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"batch_size": 8, "model": {"rnn_type": "gru", "hidden_size": 64}, "data": "x"}))
    args = parse_arguments(
        [
            "--config",
            str(config),
            "--batch_size",
            "4",
            "--model_config",
            "hidden_size=32",
            "--sample_sizes",
            "3",
            "2",
            "1",
            "--images_dir",
            "none",
            "--cache_features",
            "--strict",
            "no",
        ]
    )
    assert args.batch_size == 4 and args.data == "x" and args.sample_sizes == [3, 2, 1]
    assert args.model == {"rnn_type": "gru", "hidden_size": 32}
    assert args.images_dir is None and args.cache_features is True and args.strict is False
    assert parse_arguments(["--model-config", "dropout=0.2"]).model == {"dropout": 0.2}  # as every field: dashes too
    config.write_text(yaml.safe_dump({"batch_sise": 8}))
    with pytest.raises(SystemExit):
        parse_arguments(["--config", str(config)])


def test_mixed_precision_auto_follows_the_probe(monkeypatch):
    monkeypatch.setattr(training, "bf16_pays", lambda device: device == "cpu")
    assert training._mixed_precision("auto") == ("no" if torch.cuda.is_available() else "bf16")
    monkeypatch.setattr(training, "bf16_pays", lambda device: False)
    assert training._mixed_precision("auto") == "no" and training._mixed_precision("bf16") == "bf16"


def test_the_earlier_model_spelling_still_works_with_a_deprecation_line(caplog):
    """`train --model KEY=VALUE` became `--model_config` (in every other command --model is a saved model folder)."""
    with caplog.at_level(logging.WARNING):
        assert parse_arguments(["--model", "rnn_type=gru"]).model == {"rnn_type": "gru"}
    assert "--model_config KEY=VALUE" in caplog.text


def test_numbers_in_exponent_form_are_numbers(tmp_path, capsys):
    """YAML 1.1 reads 2e-4 (no dot) as a string; a learning rate given so used to crash the scheduler."""
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 3e-4\nwarmup_steps: 1e2\n")
    args = parse_arguments(
        ["--config", str(config), "--encoder_learning_rate", "2e-5", "--model_config", "dropout=1e-1"]
    )
    assert args.learning_rate == 3e-4 and args.encoder_learning_rate == 2e-5 and args.model["dropout"] == 0.1
    assert args.warmup_steps == 100 and isinstance(args.warmup_steps, int)
    with pytest.raises(SystemExit):
        parse_arguments(["--num_epochs", "many"])
    assert "--num-epochs: invalid int value: 'many'" in capsys.readouterr().err
    config.write_text("num_epochs: many\n")
    with pytest.raises(SystemExit):
        parse_arguments(["--config", str(config)])
    assert "num_epochs: expected int, got 'many'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,field",
    [
        (["--lr_scheduler", "cosinus"], "lr_scheduler"),
        (["--num_epochs", "0"], "num_epochs"),
        (["--learning_rate", "-1"], "learning_rate"),
        (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps"),
        (["--max_train_steps", "0"], "max_train_steps"),
        (["--eval_num_beams", "0"], "eval_num_beams"),
        (["--strict", "maybe"], "strict"),
        (["--sample_sizes", "5"], "sample_sizes"),
        (["--model_config", "foo_bar=1"], "model"),
        (["--init_from", "runs/nothing/final"], "init_from"),
        (["--processor_path", "./nothing"], "processor_path"),
        (["--model_config", "grid_size=0"], "CaptionerConfig.grid_size"),
        (["--model_config", "vocab_size=7"], "model"),
        (["--model_config", "self_attention_heads=7"], "CaptionerConfig.self_attention_heads"),
        (["--feature_cache_dtype", "int8"], "feature_cache_dtype"),
        (["--mixed_precision", "fp4"], "mixed_precision"),
        (["--warmup_steps", "-5"], "warmup_steps"),
        (["--self_critical_max_new_tokens", "0"], "self_critical_max_new"),
        (["--cache_features", "true", "--model_config", "encoder_trainable_stages=-1"], "cache_features"),
        (
            ["--model_config", "vision_output_stride=16"],
            "CaptionerConfig.vision_output_stride",
        ),  # the default transformers net
        (["--vision_pretrained", "timm:resnet10t", "--model_config", "vision_output_stride=8"], "vision_output_stride"),
    ],
)
def test_values_wrong_whatever_the_data_are_refused_in_one_line(argv, field, capsys):
    with pytest.raises(SystemExit) as stop:
        parse_arguments(argv)
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and ": error: " in last_line and field in last_line.split(": error: ")[1]


def test_a_config_file_must_be_a_mapping(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("just a sentence\n")
    with pytest.raises(SystemExit):
        parse_arguments(["--config", str(config)])
    assert "expected a mapping of field: value, got a str" in capsys.readouterr().err


def test_a_short_run_improves_validation_loss_and_saves_a_loadable_model(tmp_path):
    args = tiny_arguments(tmp_path / "run", num_epochs=3)
    metrics = train(args)
    history = metrics["history"]
    assert len(history) == 3
    assert history[-1]["val_loss"] < history[0]["val_loss"] < math.log(60)
    assert {"bleu_4", "cider", "val_loss"} <= set(history[-1])
    out = tmp_path / "run"
    assert json.loads((out / "training_args.json").read_text())["num_epochs"] == 3
    assert json.loads((out / "metrics.json").read_text())["best"]["cider"] == max(h["cider"] for h in history)
    model = AutoModel.from_pretrained(out / "final")
    processor = AutoProcessor.from_pretrained(out / "final")
    data = load_data(args)
    ids = model.generate(**processor(images=data["test"]["image"], return_tensors="pt"), max_new_tokens=8)
    assert all(caption for caption in processor.batch_decode(ids))
    assert len(list((out / "checkpoints").glob("step-*"))) == 2  # keep_checkpoints


def test_a_kill_after_the_last_steps_checkpoint_still_gets_its_final_validation(tmp_path, monkeypatch):
    common = dict(sample_sizes=[24, 8, 4], num_epochs=2, checkpoint_every_steps=1, keep_checkpoints=3)
    whole = train(tiny_arguments(tmp_path / "whole", **common))
    real_save = training.save_checkpoint

    def save_then_die(accelerator, output_dir, state, keep):
        real_save(accelerator, output_dir, state, keep)
        if state.global_step == whole["steps"] and training.owes_validation(state):
            raise KeyboardInterrupt("simulated kill after the last step's checkpoint, before its validation")

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_arguments(tmp_path / "split", **common))
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    resumed = train(tiny_arguments(tmp_path / "split", resume_from_checkpoint="latest", **common))
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in whole["history"]]
    assert resumed["history"][-1]["val_loss"] == pytest.approx(whole["history"][-1]["val_loss"])
    finals = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("whole", "split")]
    for key in finals[0]:
        torch.testing.assert_close(finals[1][key], finals[0][key], rtol=1e-5, atol=1e-6, msg=key)
    # the record the model card's "to reproduce: --config training_args.json" uses starts a run, not a resume
    assert (
        json.loads((tmp_path / "split" / "final" / "training_args.json").read_text())["resume_from_checkpoint"] is None
    )


def test_a_kill_while_a_model_folder_is_replaced_leaves_a_complete_one(tmp_path, monkeypatch):
    target = tmp_path / "best"

    def write(version: str):
        return lambda folder: (folder.mkdir(), (folder / "model.safetensors").write_text(version))

    training.replace_folder(target, write("old"))
    with pytest.raises(KeyboardInterrupt):  # killed while writing: the old folder is untouched
        training.replace_folder(target, lambda folder: (folder.mkdir(), _raise(KeyboardInterrupt())))
    assert (target / "model.safetensors").read_text() == "old"
    real_replace = os.replace

    def die_before_the_second_rename(source, destination):
        if Path(source).name == ".partial-best":
            raise KeyboardInterrupt("simulated kill between the two renames")
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", die_before_the_second_rename)
    with pytest.raises(KeyboardInterrupt):
        training.replace_folder(target, write("new"))
    monkeypatch.setattr(os, "replace", real_replace)
    assert not target.exists()  # the moment a resumed run must repair
    training.recover_folder(target)
    assert (target / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    training.replace_folder(target, write("new"))
    assert (target / "model.safetensors").read_text() == "new"


def _raise(error: BaseException):
    raise error


def test_a_resume_whose_random_state_cannot_be_restored_says_so(tmp_path, caplog):
    args = tiny_arguments(tmp_path / "run", sample_sizes=[24, 8, 4], num_epochs=1)
    train(args)
    checkpoint = training.list_checkpoints(tmp_path / "run")[-1]
    resume = tiny_arguments(tmp_path / "run", sample_sizes=[24, 8, 4], num_epochs=1, resume_from_checkpoint="latest")
    with caplog.at_level(logging.WARNING):
        train(resume)
    assert "could not be restored" not in caplog.text
    (checkpoint / "random_states_0.pkl").write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING):
        train(resume)
    assert "random number state (random_states_*.pkl) could not be restored" in caplog.text
    assert checkpoint.name in caplog.text


def test_a_new_run_does_not_mix_with_another_runs_output_dir(tmp_path):
    """Another run's checkpoints would sort among the new run's (and prune them), and `latest` would resume the
    wrong run: the folder is refused, or, with overwrite_output_dir, cleared first."""
    common = dict(sample_sizes=[24, 8, 4], checkpoint_every_steps=2, keep_checkpoints=2)
    first = train(tiny_arguments(tmp_path / "run", num_epochs=2, **common))
    with pytest.raises(FileExistsError, match="holds another run .*--overwrite_output_dir"):
        train(tiny_arguments(tmp_path / "run", num_epochs=1, **common))
    second = train(tiny_arguments(tmp_path / "run", num_epochs=1, overwrite_output_dir=True, **common))
    assert second["steps"] < first["steps"]
    kept = [int(p.name.split("-")[1]) for p in training.list_checkpoints(tmp_path / "run")]
    assert kept and max(kept) == second["steps"]  # none of the first run's later checkpoints is left
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == second["steps"]


def test_the_train_command_says_a_missing_checkpoint_or_a_taken_output_dir_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setattr(training, "load_data", lambda args: pytest.fail("data read before the check"))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.json").write_text("{}")
    for argv, message in (
        (
            ["--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", str(tmp_path / "nothing")],
            "is not a complete checkpoint",
        ),
        (["--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", "latest"], "no checkpoint under"),
        (["--output_dir", str(tmp_path / "taken")], "holds another run"),
    ):
        with pytest.raises(SystemExit) as stop:
            train_command.main(["--report_to", "none", *argv])
        assert str(stop.value.code).startswith("hf-captioner train: error: ") and message in str(stop.value.code)


@pytest.mark.parametrize(
    "model, message",
    [
        ({"vision_backbone": "timm:mobilenetv3_small_050", "encoder_trainable_stages": 1}, "set cache_features false"),
        (
            {"vision_backbone": "torchvision:resnet18", "vision_output_stride": 16, "encoder_trainable_stages": 0},
            "bottleneck ResNets",
        ),
    ],
)
def test_the_train_command_says_what_the_backbone_cannot_do_in_one_line(model, message, tmp_path):
    """Only the built network knows whether it splits into a cacheable bottom or dilates: the command still ends in
    one line naming the setting, not a traceback."""
    config = tmp_path / "run.yaml"
    args = dataclasses.asdict(tiny_arguments(tmp_path / "run", report_to="none")) | {"cache_features": True}
    args["model"] = {k: v for k, v in args["model"].items() if k != "vision_config"} | model
    config.write_text(yaml.safe_dump(args))
    with pytest.raises(SystemExit) as stop:
        train_command.main(["--config", str(config)])
    assert str(stop.value.code).startswith("hf-captioner train: error: ") and message in str(stop.value.code)
    assert "\n" not in str(stop.value.code)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path, monkeypatch):
    # about 9 steps per epoch: the kill after the step-12 checkpoint falls in the middle of the second epoch
    common = dict(sample_sizes=[24, 8, 4], num_epochs=2, checkpoint_every_steps=4, keep_checkpoints=10)
    train(tiny_arguments(tmp_path / "whole", **common))

    real_save = training.save_checkpoint

    def save_then_die(accelerator, output_dir, state, keep):
        real_save(accelerator, output_dir, state, keep)
        if state.global_step == 12:
            raise KeyboardInterrupt("simulated kill after the step-12 checkpoint")

    monkeypatch.setattr(training, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_arguments(tmp_path / "split", **common))
    monkeypatch.setattr(training, "save_checkpoint", real_save)
    assert training.list_checkpoints(tmp_path / "split")[-1].name == "step-12"
    train(tiny_arguments(tmp_path / "split", resume_from_checkpoint="latest", **common))

    whole_last = training.list_checkpoints(tmp_path / "whole")[-1]
    resumed_last = training.list_checkpoints(tmp_path / "split")[-1]
    assert whole_last.name == resumed_last.name and int(whole_last.name.split("-")[1]) > 12
    whole = load_file(whole_last / "model.safetensors")
    resumed = load_file(resumed_last / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        torch.testing.assert_close(resumed[key], whole[key], rtol=1e-5, atol=1e-6, msg=key)
    whole_history = json.loads((tmp_path / "whole" / "metrics.json").read_text())["history"]
    resumed_history = json.loads((tmp_path / "split" / "metrics.json").read_text())["history"]
    assert [h["val_loss"] for h in resumed_history] == pytest.approx([h["val_loss"] for h in whole_history])


def test_a_partial_checkpoint_is_never_taken_for_the_latest(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "step-3").mkdir(parents=True)
    (checkpoints / "step-3" / training.STATE_FILE).write_text("{}")
    (checkpoints / ".partial-step-6").mkdir()  # a save that was killed half-way
    (checkpoints / "step-9").mkdir()  # no state file: incomplete
    assert training.resolve_checkpoint(tmp_path, "latest") == checkpoints / "step-3"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        training.resolve_checkpoint(tmp_path, str(checkpoints / "step-9"))


def test_cached_features_give_the_first_batch_loss_of_a_frozen_end_to_end_model(tmp_path):
    args = tiny_arguments(
        tmp_path, model={**tiny_arguments(tmp_path).model, "encoder_trainable_stages": 0, "dropout": 0.0}
    )
    data = load_data(args)
    processor = build_processor(args, data["train"]["captions"])
    torch.manual_seed(0)
    model = build_model(args, processor).train()
    features = encode_split(model, processor, data["train"], tmp_path / "cache")
    collator = CaptionCollator(processor)
    cached_batch = collator([CaptionPairs(data["train"], features)[i] for i in range(8)])
    image_batch = collator([CaptionPairs(data["train"])[i] for i in range(8)])
    assert "encoder_outputs" in cached_batch and "pixel_values" in image_batch
    lengths = (cached_batch["labels"] != -100).sum(1)
    assert lengths.tolist() == sorted(lengths.tolist(), reverse=True)  # longest first, for teacher forcing
    # the 8 pairs are 5 + 3 captions of two images: each image's input is in the batch once
    assert len(cached_batch["encoder_outputs"]) == len(image_batch["pixel_values"]) == 2
    items = [CaptionPairs(data["train"], features)[i] for i in range(8)]
    pairs = {(tuple(collator([item])["labels"][0].tolist()), item["encoder_outputs"].sum().item()) for item in items}
    row_regions = cached_batch["encoder_outputs"][cached_batch["image_index"]]
    batch_rows = zip(cached_batch["labels"], row_regions, strict=True)  # each caption kept with its image
    assert {(tuple(ids[ids != -100].tolist()), regions.sum().item()) for ids, regions in batch_rows} == pairs
    cached_loss = model(**cached_batch).loss
    image_loss = model(**image_batch).loss
    torch.testing.assert_close(cached_loss, image_loss, rtol=1e-5, atol=1e-6)
    per_caption = model(encoder_outputs=row_regions, labels=cached_batch["labels"]).loss  # each image once per caption
    torch.testing.assert_close(cached_loss, per_caption, rtol=1e-6, atol=1e-7)
    # reused on disk, and keyed so that another grid (or other weights) gets its own features
    assert [path.name for path in (tmp_path / "cache").iterdir()] == [features.folder.name]
    again = encode_split(model, processor, data["train"], tmp_path / "cache")
    assert torch.equal(again[range(len(again))], features[range(len(features))])
    key = feature_cache_key(model, processor, data["train"])
    processor.save_pretrained(tmp_path / "processor")  # a reloaded processor computes the same pixels: same key
    reloaded = type(processor).from_pretrained(tmp_path / "processor")
    assert feature_cache_key(model, reloaded, data["train"]) == key
    model.save_pretrained(tmp_path / "model")  # so does a reloaded model (its config then says its dtype)
    assert feature_cache_key(AutoModel.from_pretrained(tmp_path / "model"), processor, data["train"]) == key
    model.config.grid_size = 3
    assert feature_cache_key(model, processor, data["train"]) != key
    # a dilated network: the same weights give other regions, but the same frozen bottom (it ends before the dilation)
    keys = {}
    for stride, stages in itertools.product((32, 16), (0, 1)):
        torch.manual_seed(0)
        lite = CaptionerForConditionalGeneration(
            CaptionerConfig(
                vision_backbone="timm:tf_efficientnet_lite0",
                vision_output_stride=stride,
                encoder_trainable_stages=stages,
            )
        )
        keys[stride, stages] = feature_cache_key(lite, processor, data["train"])
    assert keys[16, 0] != keys[32, 0] and keys[16, 1] == keys[32, 1]


def test_training_from_cached_features_saves_a_full_model(tmp_path):
    model_config = {**tiny_arguments(tmp_path).model, "encoder_trainable_stages": 0}
    args = tiny_arguments(
        tmp_path / "run",
        model=model_config,
        cache_features=True,
        feature_cache_dir=str(tmp_path / "cache"),
        num_epochs=1,
        no_repeat_ngram_size=2,
    )
    train(args)
    model = AutoModel.from_pretrained(tmp_path / "run" / "final")
    assert model.encoder.num_channels == TINY_VISION["hidden_sizes"][-1]
    assert model.generation_config.no_repeat_ngram_size == 2  # the run's decoding default travels with the model
    with pytest.raises(ValueError, match="encoder_trainable_stages > 0"):
        train(tiny_arguments(tmp_path / "bad", cache_features=True, feature_cache_dir=str(tmp_path / "cache")))


def test_fine_tuning_the_top_stage_from_cached_bottom_features(tmp_path):
    """With the last stage fine-tuning, the store caches the frozen bottom's output: training (batches holding all
    captions of their images, so the top runs once per image) changes the top and not the bottom, the store's key
    does not move with the top (a resumed run reuses it), and the trained model captions the same from the store as
    from the images."""
    model = {k: v for k, v in tiny_arguments(tmp_path).model.items() if k != "vision_config"}
    model.update(vision_backbone="timm:resnet10t", encoder_trainable_stages=1)
    args = tiny_arguments(
        tmp_path / "run",
        model=model,
        cache_features=True,
        num_epochs=1,
        feature_cache_dir=str(tmp_path / "cache"),
        group_captions_by_image=True,
    )
    data = load_data(args)
    processor = build_processor(args, data["train"]["captions"])
    torch.manual_seed(args.seed)
    before = build_model(args, processor)
    key = feature_cache_key(before, processor, data["train"])
    train(args)
    after = AutoModel.from_pretrained(tmp_path / "run" / "final").eval()
    assert feature_cache_key(after, processor, data["train"]) == key
    bottom, top = (sum(len(list(layer.parameters())) for layer in part) for part in after.encoder.split_layers())
    changed = [
        not torch.equal(a, b) for a, b in zip(after.encoder.parameters(), before.encoder.parameters(), strict=True)
    ]
    assert not any(changed[:bottom]) and any(changed[bottom:]) and bottom + top == len(changed)
    stores = [FeatureStore(folder) for folder in sorted((tmp_path / "cache").iterdir())]
    assert [store.input_name for store in stores] == ["frozen_features"] * 2  # train and validation
    validation = data["validation"]
    store = next(store for store in stores if len(store) == len(validation))
    from_store = generate_captions(after, processor, validation, features=store, progress=False, max_new_tokens=8)
    from_images = generate_captions(after, processor, validation, progress=False, max_new_tokens=8)
    assert from_store == from_images
    # self-critical training samples from and fine-tunes the top on the same store
    train(
        tiny_arguments(
            tmp_path / "scst",
            model=model,
            cache_features=True,
            num_epochs=1,
            objective="self_critical",
            init_from=str(tmp_path / "run" / "final"),
            feature_cache_dir=str(tmp_path / "cache"),
        )
    )
    assert len(list((tmp_path / "cache").iterdir())) == 2
    tuned = AutoModel.from_pretrained(tmp_path / "scst" / "final")
    assert not all(
        torch.equal(a, b) for a, b in zip(tuned.encoder.parameters(), after.encoder.parameters(), strict=True)
    )


@pytest.mark.slow
def test_accelerate_launch_with_two_cpu_processes_trains_data_parallel(tmp_path):
    """Two processes of 16 captions each take the optimizer steps of one process of 32, at the same learning rates
    (Accelerate steps a prepared scheduler once per process); both read one feature store, cached once. The model
    has hard attention (two draws per caption) and attention supervision: sampled regions, and the sample shapes'
    attention targets, train data-parallel from cached features too."""
    config = tmp_path / "tiny.yaml"
    model = {
        **tiny_arguments(tmp_path).model,
        "encoder_trainable_stages": 0,
        "hard_attention": True,
        "hard_attention_draws": 2,
        "hard_attention_baseline": "other_draws",
        "attention_supervision_weight": 0.5,
    }
    cached = dict(model=model, cache_features=True, feature_cache_dir=str(tmp_path / "features"))
    args = tiny_arguments(tmp_path / "ddp", num_epochs=2, warmup_steps=3, log_every_steps=1, **cached)
    config.write_text(yaml.safe_dump({k: v for k, v in vars(args).items()}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    accelerate_config = REPO / "configs" / "accelerate" / "cpu_2_processes.yaml"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config),
        "--main_process_port",
        "0",
        "-m",
        "hf_captioner.commands.train",
        "--config",
        str(config),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    first_error = result.stderr.find("Traceback")  # a rank's own traceback, before the launcher's summary
    assert result.returncode == 0, result.stderr[first_error : first_error + 6000] + result.stderr[-2000:]
    metrics = json.loads((tmp_path / "ddp" / "metrics.json").read_text())
    assert metrics["num_processes"] == 2
    pairs = len(CaptionPairs(load_data(args)["train"]))
    assert metrics["steps"] == 2 * math.ceil(math.ceil(pairs / 16) / 2)  # each process takes every other batch
    assert (tmp_path / "ddp" / "final" / "model.safetensors").is_file()
    assert all(entry["train/supervision_loss"] > 0 for entry in metrics["log_history"])
    for entry in metrics["log_history"]:  # hard attention's diagnostics, the policy term's gradient taken apart
        assert entry["train/grad_norm"] > 0 and 0 <= entry["train/clipped_share"] <= 1
        assert entry["train/hard_attention/policy_grad_norm"] > 0 < entry["train/hard_attention/token_loss_grad_norm"]
    sampled = [entry for entry in metrics["log_history"] if "train/hard_attention/peak_moves" in entry]
    assert sampled and all(0 < entry["train/hard_attention/attention_entropy"] <= 1 for entry in sampled)
    assert len(list((tmp_path / "features").iterdir())) == 2  # train and validation, each on disk once
    single = train(
        tiny_arguments(tmp_path / "single", num_epochs=2, warmup_steps=3, log_every_steps=1, batch_size=32, **cached)
    )
    assert single["steps"] == metrics["steps"]
    steps = [entry["step"] for entry in metrics["log_history"]]
    assert steps == [entry["step"] for entry in single["log_history"]] == list(range(1, metrics["steps"] + 1))
    rates = [entry["lr"] for entry in metrics["log_history"]]
    assert rates == pytest.approx([entry["lr"] for entry in single["log_history"]], rel=1e-9)
    assert rates[0] < rates[2] > rates[-1]  # warm-up for 3 steps, then the cosine decay
