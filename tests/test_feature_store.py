"""The on-disk feature store: what it reads back, lazily, across processes, and how a killed caching run resumes."""

import json
import logging
import subprocess
import sys

import pytest
import torch
from conftest import tiny_arguments
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from hf_captioner.data.feature_store import LAYOUT_FILE, FeatureStore, encode_split, shard_path
from hf_captioner.data.pairs import CaptionCollator, CaptionPairs
from hf_captioner.training import build_model, build_processor, load_data

FROZEN = {**tiny_arguments("unused").model, "encoder_trainable_stages": 0}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A frozen tiny model, its processor and the sample train split (48 images), and its features computed directly."""
    args = tiny_arguments(tmp_path_factory.mktemp("run"), model=FROZEN)
    data = load_data(args)
    processor = build_processor(args, data["train"]["captions"])
    torch.manual_seed(0)
    model = build_model(args, processor).eval()
    pixels = processor.image_processor(data["train"]["image"], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model.encoder(pixels).last_hidden_state
    return model, processor, data["train"], expected


def shard_bytes_for(expected: torch.Tensor, images: int) -> int:
    return images * expected[0].numel() * 4  # float32


def every_row(store: FeatureStore) -> torch.Tensor:
    return store[range(len(store))]


class KilledAfter:
    """Stands in for a kill: an encoder forward that raises after `calls` calls (None: never), counting its calls."""

    def __init__(self, forward, calls: int | None):
        self.forward, self.calls_left, self.calls = forward, calls, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls_left is not None and self.calls > self.calls_left:
            raise KeyboardInterrupt
        return self.forward(*args, **kwargs)


def test_a_store_reads_back_what_the_encoder_computed_in_shards_and_dtypes(setup, tmp_path):
    model, processor, train, expected = setup
    store = encode_split(model, processor, train, tmp_path, batch_size=8, shard_bytes=shard_bytes_for(expected, 20))
    assert len(store) == len(train) == 48 and store.num_shards == 3  # 20 + 20 + 8 images
    assert store.dtype == torch.float32 and store.feature_shape == tuple(expected.shape[1:])
    torch.testing.assert_close(every_row(store), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(store[[47, 0, 21]], expected[[47, 0, 21]], rtol=1e-5, atol=1e-6)
    with pytest.raises(IndexError, match="row 48 out of range"):
        store[48]
    half = encode_split(model, processor, train, tmp_path, batch_size=8, dtype="bfloat16")
    assert half.folder != store.folder and half.dtype == torch.bfloat16  # its own store, never mixed up
    assert torch.equal(every_row(half), every_row(store).to(torch.bfloat16))
    # the collator hands the model float32, whatever the store keeps
    batch = CaptionCollator(processor)([CaptionPairs(train, half)[i] for i in range(4)])
    assert batch["encoder_outputs"].dtype == torch.float32
    with pytest.raises(ValueError, match="feature store dtype"):
        encode_split(model, processor, train, tmp_path, dtype="int8")


def test_a_bf16_encoder_pass_fills_its_own_store_with_what_bf16_autocast_computes(setup, tmp_path):
    model, processor, train, expected = setup
    float32 = encode_split(model, processor, train, tmp_path, batch_size=8)
    bf16 = encode_split(model, processor, train, tmp_path, batch_size=8, precision="bf16")
    assert bf16.folder != float32.folder  # the key says how the features were computed
    pixel_values = processor.image_processor([train[i]["image"] for i in range(8)], return_tensors="pt")
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        direct = model.encoder(pixel_values["pixel_values"]).last_hidden_state.float()
    torch.testing.assert_close(every_row(bf16)[:8], direct, rtol=0, atol=0)
    torch.testing.assert_close(every_row(bf16), expected, rtol=0.1, atol=0.1)  # close to float32's, not equal
    assert encode_split(model, processor, train, tmp_path, batch_size=8, precision="bf16").folder == bf16.folder
    with pytest.raises(ValueError, match="encoder precision"):
        encode_split(model, processor, train, tmp_path, precision="fp8")


def test_single_file_caches_of_older_versions_are_pointed_out(setup, tmp_path, caplog):
    model, processor, train, _ = setup
    save_file({"features": torch.zeros(2, 3)}, tmp_path / "0123456789abcdef01234567.safetensors")
    with caplog.at_level(logging.WARNING):
        encode_split(model, processor, train, tmp_path, batch_size=16)
    assert "1 feature cache file(s) of an older hf-captioner that are no longer read" in caplog.text


def test_a_killed_caching_run_resumes_at_its_first_missing_shard(setup, tmp_path, monkeypatch):
    model, processor, train, expected = setup
    shard_bytes = shard_bytes_for(expected, 16)  # 3 shards of 2 batches of 8
    # calls: 2 per shard; killed at shard 1's start, then half-way into it
    for calls_before_kill in (2, 3):
        cache = tmp_path / f"killed-{calls_before_kill}"
        monkeypatch.setattr(model.encoder, "forward", KilledAfter(model.encoder.forward, calls_before_kill))
        with pytest.raises(KeyboardInterrupt):
            encode_split(model, processor, train, cache, batch_size=8, shard_bytes=shard_bytes)
        monkeypatch.undo()
        folder = next(cache.iterdir())
        assert sorted(path.name for path in folder.glob("shard-*")) == ["shard-00000.safetensors"]
        with pytest.raises(FileNotFoundError, match=r"shards \[1, 2\] of 3 are missing"):
            FeatureStore(folder)
        # what else a kill can leave: a partial file of a dead process, a shard cut short on disk
        (folder / "shard-00001.safetensors.999999999.partial").write_bytes(b"half a shard")
        shard_path(folder, 2).write_bytes(b"\x08" + b"\x00" * 20)
        counting = KilledAfter(model.encoder.forward, None)
        monkeypatch.setattr(model.encoder, "forward", counting)
        store = encode_split(model, processor, train, cache, batch_size=8, shard_bytes=shard_bytes)
        monkeypatch.undo()
        assert counting.calls == 4  # shards 1 and 2 only: shard 0 and the layout were kept
        assert not list(folder.glob("*.partial"))
        torch.testing.assert_close(every_row(store), expected, rtol=1e-5, atol=1e-6)


def test_reads_are_lazy_and_shared_by_processes(tmp_path):
    """A 64 MB store opened and read row by row grows the reader's own (anonymous) memory by far less than its size;
    other processes (DataLoader workers, a second program) read the same rows from the same files."""
    folder = tmp_path / "store"
    folder.mkdir()
    rows, shape = 512, (64, 512)  # 128 KB a row, 128 rows a shard
    layout = {"num_images": rows, "shard_size": 128, "feature_shape": list(shape), "dtype": "float32"}
    (folder / LAYOUT_FILE).write_text(json.dumps(layout))
    generator = torch.Generator().manual_seed(0)
    for index in range(4):
        save_file({"features": torch.randn(128, *shape, generator=generator)}, shard_path(folder, index))

    def own_memory_mb() -> float:
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(status["RssAnon"].split()[0]) / 1024

    before = own_memory_mb()
    store = FeatureStore(folder)
    checksum = sum(store[row].double().sum().item() for row in range(len(store)))
    assert own_memory_mb() - before < 16  # the store is 64 MB
    assert store[[5, 300]].shape == (2, *shape)

    code = (
        "import sys; from hf_captioner.data.feature_store import FeatureStore; s = FeatureStore(sys.argv[1]); "
        "print(sum(s[r].double().sum().item() for r in range(len(s))))"
    )
    other = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
    assert float(other.stdout) == pytest.approx(checksum, rel=1e-12)
    in_workers = DataLoader(store, batch_size=64, num_workers=2)  # the store pickles without its open files
    assert torch.equal(torch.cat(list(in_workers)), store[range(len(store))])
