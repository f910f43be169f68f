"""Shared fixtures: tiny configs and a tiny tokenizer, so the whole suite runs on a 2-core CPU, offline."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ast  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import zlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from hf_captioner import CaptionerConfig, CaptionerForConditionalGeneration, train_tokenizer  # noqa: E402
from hf_captioner.arguments import TrainingArguments  # noqa: E402
from hf_captioner.training import train  # noqa: E402

HF_CAPTIONER = str(Path(sys.executable).with_name("hf-captioner"))  # the console command, as users run it
TINY_VISION = {
    "model_type": "resnet",
    "layer_type": "basic",
    "embedding_size": 8,
    "depths": [1, 1],
    "hidden_sizes": [8, 16],
}
TINY_CAPTIONS = [
    "a red circle on the left",
    "a blue square at the top",
    "a green triangle next to a red circle",
    "two yellow stars below a blue square",
    "a small purple circle in the middle",
    "a large orange square on the right",
]


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: its header is fine (PIL's `verify()` passes it), its data is not."""
    Image.effect_noise((64, 64), 60).convert("RGB").save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def write_bomb_png(path: Path, side: int = 50_000) -> Path:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    buffer = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    header = data[12:16] + struct.pack(">II", side, side) + data[24:29]  # IHDR type, size, then depth etc.
    data[16:24] = header[4:12]
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(header)))
    path.write_bytes(bytes(data))
    return path


def tiny_config(**overrides) -> CaptionerConfig:
    """A decoder a few thousand parameters big, on a two-stage ResNet, with a 3 x 3 grid."""
    values = dict(
        vision_config=dict(TINY_VISION),
        grid_size=3,
        embed_dim=16,
        hidden_size=16,
        attention_dim=12,
        self_attention_heads=2,
        vocab_size=40,
        dropout=0.0,
        attention_penalty=1.0,  # on, so that the tests exercise it
    )
    values.update(overrides)
    return CaptionerConfig(**values)


def tiny_model(seed: int = 0, **overrides) -> CaptionerForConditionalGeneration:
    torch.manual_seed(seed)
    return CaptionerForConditionalGeneration(tiny_config(**overrides)).eval()


def images(batch: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def token_ids(batch: int = 3, length: int = 7, seed: int = 2) -> torch.Tensor:
    return torch.randint(4, 40, (batch, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def decode_step_by_step(model, pixel_values: torch.Tensor, inputs: torch.Tensor) -> list:
    """The model's outputs for `inputs` fed one token at a time through its cache (attentions included)."""
    encoder_outputs = model.encoder(pixel_values)
    cache, outputs = None, []
    for t in range(inputs.shape[1]):
        out = model(
            encoder_outputs=encoder_outputs,
            decoder_input_ids=inputs[:, t : t + 1],
            cache=cache,
            use_cache=True,
            output_attentions=True,
        )
        cache = out.cache
        outputs.append(out)
    return outputs


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tokenizer(TINY_CAPTIONS * 5, vocab_size=64)


def tiny_arguments(output_dir, **overrides) -> TrainingArguments:
    values = dict(
        data="sample",
        sample_sizes=[48, 12, 4],
        sample_image_size=32,
        image_size=32,
        resize_size=32,
        tokenizer_model_type="word",
        vocab_size=60,
        model={
            "vision_config": dict(TINY_VISION),
            "grid_size": 2,
            "embed_dim": 24,
            "hidden_size": 32,
            "attention_dim": 16,
            "self_attention_heads": 2,
            "dropout": 0.3,
            "encoder_trainable_stages": -1,
        },
        num_epochs=2,
        batch_size=16,
        eval_batch_size=32,
        learning_rate=3e-3,
        encoder_learning_rate=3e-3,
        log_every_steps=5,
        report_to="none",
        output_dir=str(output_dir),
        eval_max_new_tokens=12,
        self_critical_max_new_tokens=12,
        early_stopping_patience=0,
    )
    values.update(overrides)
    return TrainingArguments(**values)


@pytest.fixture(scope="session")
def trained_tiny_model(tmp_path_factory):
    """A tiny captioner trained for two epochs on a small sample split: its `final` folder."""
    output = tmp_path_factory.mktemp("trained") / "run"
    train(tiny_arguments(output, sample_sizes=[48, 12, 8], num_epochs=2))
    return output / "final"


def run_snippets_without_package(snippets: list[str], cwd: Path) -> list[list]:
    """Run each documented usage snippet as written, in `cwd`, in a Python that cannot import hf_captioner (a saved
    folder's own code must be enough), offline; the values each one prints, one per line."""
    blocker = "import sys\nsys.modules['hf_captioner'] = None\n"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    printed = []
    for snippet in snippets:
        result = subprocess.run(
            [sys.executable, "-c", blocker + snippet], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
        )
        assert result.returncode == 0, f"{snippet}\n{result.stderr[-3000:]}"
        printed.append([ast.literal_eval(line) for line in result.stdout.strip().splitlines()])
    return printed


def python_snippets(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)
