"""Cached encoder features on disk: one split's region features in shards, written as they are computed and read
row by row through memory maps.

Why this shape: a run's own memory must not grow with the data set (Flickr30k or COCO features are tens of GB), and
the processes of one `accelerate launch` should share the operating system's page cache instead of each loading a
copy. Each shard is a plain safetensors file whose rows `safe_open` reads lazily from a memory map; a shard appears
only by an atomic rename once it is complete, so a killed caching run resumes at its first missing shard and never
reads a half-written one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

STORE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
LAYOUT_FILE = "layout.json"
SHARD_BYTES = 256 * 2**20  # one shard is the most a caching run holds in memory and the most a kill loses
TENSOR = "features"

# fields that say where a class lives or how weights were saved, not how features are made (they change on
# save -> load; the features are computed in float32 whatever the saved dtype)
BOOKKEEPING = ("auto_map", "processor_class", "image_processor_type", "dtype", "torch_dtype")


def stored_input(model) -> str:
    """What a store for this model holds, by the model input it feeds: the regions ("encoder_outputs") of a frozen
    encoder, or, when the encoder's last stages fine-tune, the output of its frozen bottom ("frozen_features"), so that
    the bottom runs once per image and only the top per step."""
    if model.encoder.is_frozen:
        return "encoder_outputs"
    model.encoder.split_layers()  # raises, naming the config, when there is no frozen bottom to cache
    return "frozen_features"


def feature_cache_key(model, processor, dataset, precision: str = "float32") -> str:
    """A key that changes whenever the cached features would: what is stored, the weights and shape of what computes
    it (the whole backbone, or only its frozen bottom, whose weights training never changes), its output stride,
    image processing, grid size, the split's content (its `datasets` fingerprint), and a bf16 encoder pass."""
    stored = stored_input(model)
    if stored == "frozen_features":
        bottom = model.encoder.split_layers()[0]
        weights = {f"{i}.{name}": t for i, layer in enumerate(bottom) for name, t in layer.state_dict().items()}
        stored = f"{stored} of {len(bottom)} layers"
        computing = list(bottom)
    else:
        weights = model.encoder.state_dict()
        computing = [model.encoder]
    digest = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    description = {
        "stored": stored,
        "vision_config": {k: v for k, v in model.config.vision_config.to_dict().items() if k not in BOOKKEEPING},
        "grid_size": model.config.grid_size,
        "image_processor": {k: v for k, v in processor.image_processor.to_dict().items() if k not in BOOKKEEPING},
        "data": dataset._fingerprint,
    }
    if any_dilated(computing):  # the same weights give other features; absent when undilated (older keys)
        description["vision_output_stride"] = model.config.vision_output_stride
    if precision != "float32":  # other features again; absent in float32 (older keys)
        description["encoder_precision"] = precision
    digest.update(json.dumps(description, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:24]


def any_dilated(modules: list[torch.nn.Module]) -> bool:
    """Whether a convolution in `modules` is dilated: a dilated network's frozen bottom usually ends before its dilated
    stage, and then stores the same features at either output stride."""
    return any(isinstance(m, torch.nn.Conv2d) and max(m.dilation) > 1 for module in modules for m in module.modules())


def shard_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:05d}.safetensors"


def read_layout(folder: Path) -> dict | None:
    """The store's layout (images, shard size, feature shape, dtype), or None when it has none or an unreadable one."""
    try:
        return json.loads((folder / LAYOUT_FILE).read_text())
    except (OSError, ValueError):
        return None


def shard_rows(layout: dict, index: int) -> range:
    start = index * layout["shard_size"]
    return range(start, min(start + layout["shard_size"], layout["num_images"]))


def num_shards(layout: dict) -> int:
    return math.ceil(layout["num_images"] / layout["shard_size"])


def missing_shards(folder: Path, layout: dict) -> list[int]:
    return [index for index in range(num_shards(layout)) if not shard_is_complete(folder, layout, index)]


def shard_is_complete(folder: Path, layout: dict, index: int) -> bool:
    """A shard counts only if its file opens and holds exactly its rows, in the store's shape and dtype."""
    try:
        with safe_open(shard_path(folder, index), framework="pt") as shard:
            tensor = shard.get_slice(TENSOR)
            shape, dtype = tensor.get_shape(), tensor.get_dtype()
    except Exception:  # missing, truncated or not safetensors: safetensors raises several kinds
        return False
    expected = [len(shard_rows(layout, index)), *layout["feature_shape"]]
    return shape == expected and dtype == SAFETENSORS_DTYPES[layout["dtype"]]


class FeatureStore:
    """A complete store, read lazily: `store[row]` is one image's features (k, C), `store[rows]` a stacked batch,
    in the stored dtype. Pickles without its open files (DataLoader workers reopen them)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        layout = read_layout(self.folder)
        if layout is None:
            raise FileNotFoundError(f"{self.folder} is not a feature store (no readable {LAYOUT_FILE})")
        self.layout = layout
        self.num_shards = num_shards(layout)
        missing = missing_shards(self.folder, layout)
        if missing:
            raise FileNotFoundError(
                f"{self.folder}: shards {missing[:5]} of {self.num_shards} are missing or "
                "incomplete (a caching run was stopped; run it again to finish the store)"
            )
        self._shards = None

    @property
    def dtype(self) -> torch.dtype:
        return STORE_DTYPES[self.layout["dtype"]]

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return tuple(self.layout["feature_shape"])

    @property
    def input_name(self) -> str:
        """The model input its rows are: "encoder_outputs" (regions) or "frozen_features" (see `stored_input`)."""
        return self.layout.get("input", "encoder_outputs")  # stores written before the field held regions

    def __len__(self) -> int:
        return self.layout["num_images"]

    def __getitem__(self, rows: int | Sequence[int]) -> torch.Tensor:
        if isinstance(rows, int):
            return self._row(rows)
        return torch.stack([self._row(int(row)) for row in rows])

    def _row(self, row: int) -> torch.Tensor:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a feature store of {len(self)} images")
        if self._shards is None:  # opened on first use, in the process that reads
            self._shards = [
                safe_open(shard_path(self.folder, i), framework="pt").get_slice(TENSOR) for i in range(self.num_shards)
            ]
        shard, offset = divmod(row, self.layout["shard_size"])
        return self._shards[shard][offset]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shards": None}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.folder)!r}, images={len(self)}, shape={self.feature_shape}, dtype={self.dtype})"


def store_folder(
    model, processor, dataset, cache_dir: str | os.PathLike, dtype: str, precision: str = "float32"
) -> Path:
    return Path(cache_dir).expanduser() / f"{feature_cache_key(model, processor, dataset, precision)}-{dtype}"


@torch.no_grad()
def encode_split(
    model,
    processor,
    dataset,
    cache_dir: str | os.PathLike,
    batch_size: int = 64,
    dtype: str = "float32",
    shard_bytes: int = SHARD_BYTES,
    precision: str = "float32",
) -> FeatureStore:
    """The region features of every image of a split (or, when the encoder's last stages fine-tune, the output of its
    frozen bottom), computed once into an on-disk store that later runs (and the other processes of this one) read
    lazily. A store left incomplete by a killed run is finished, not redone. `precision` "bf16" runs the encoder under
    bf16 autocast (other features, so another store)."""
    if dtype not in STORE_DTYPES:
        raise ValueError(f"feature store dtype: expected one of {list(STORE_DTYPES)}, got {dtype!r}")
    if precision not in ("float32", "bf16"):
        raise ValueError(f"feature store encoder precision: expected float32 or bf16, got {precision!r}")
    if len(dataset) == 0:
        raise ValueError("cannot cache the features of an empty split")
    folder = store_folder(model, processor, dataset, cache_dir, dtype, precision)
    _mention_old_caches(folder.parent)
    layout = read_layout(folder)
    if layout is not None and layout["num_images"] != len(dataset):  # not this split's: never mix two
        layout = None
    if layout is not None and not missing_shards(folder, layout):
        logger.info("Reusing cached encoder features %s", folder)
        return FeatureStore(folder)

    encoder = model.encoder.eval()
    device = next(encoder.parameters()).device
    stored = stored_input(model)
    compute = encoder.frozen_features if stored == "frozen_features" else lambda x: encoder(x).last_hidden_state

    def encode(rows: range):
        """Batches of this many rows' features, in order, in the store's dtype, on the CPU."""
        images = dataset.select(rows).select_columns(["image"])  # decoded lazily, batch by batch

        def collate(items: list[dict]) -> torch.Tensor:
            return processor.image_processor([item["image"] for item in items], return_tensors="pt")["pixel_values"]

        # its own generator: iterating must not draw from the global RNG, or a cold cache would change the training run
        loader = DataLoader(images, batch_size=batch_size, collate_fn=collate, generator=torch.Generator())
        for pixel_values in loader:
            pixel_values = pixel_values.to(device).contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                features = compute(pixel_values)
            yield features.to("cpu", STORE_DTYPES[dtype])

    folder.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_partials(folder)
    if layout is None:  # a new store: grid_size^2 regions of num_channels each, or the bottom's map for one image
        feature_shape = (
            [model.config.grid_size**2, encoder.num_channels]
            if stored == "encoder_outputs"
            else list(next(encode(range(1))).shape[1:])
        )
        layout = {
            "num_images": len(dataset),
            "feature_shape": feature_shape,
            "dtype": dtype,
            "input": stored,
            "shard_size": max(1, shard_bytes // _image_bytes(feature_shape, dtype)),
        }
        for stale in folder.glob("shard-*.safetensors"):  # from a store of another layout
            stale.unlink()
        _write_atomically(folder / LAYOUT_FILE, lambda path: path.write_text(json.dumps(layout, indent=2)))
    todo = missing_shards(folder, layout)
    _check_free_space(folder, layout, len(todo))

    done = len(dataset) - sum(len(shard_rows(layout, i)) for i in todo)
    if done:
        logger.info("Resuming the feature store %s: %d of %d images already cached", folder, done, len(dataset))
    # NHWC convolutions: faster encoding on CPUs (docs/performance.md), and the features differ by float rounding
    # only (2e-5 at most), so the store key does not change with the layout
    kernels = [p for p in encoder.parameters() if p.dim() == 4]
    layout_before = (
        torch.channels_last
        if kernels and kernels[0].is_contiguous(memory_format=torch.channels_last)
        else torch.contiguous_format
    )
    encoder.to(memory_format=torch.channels_last)
    with tqdm(total=len(dataset), initial=done, unit="img", desc="Caching encoder features") as progress:
        for index in todo:
            rows = shard_rows(layout, index)
            shard = torch.empty(len(rows), *layout["feature_shape"], dtype=STORE_DTYPES[dtype])
            filled = 0
            for features in encode(rows):
                shard[filled : filled + len(features)] = features
                filled += len(features)
                progress.update(len(features))
            _write_atomically(shard_path(folder, index), lambda path, shard=shard: save_file({TENSOR: shard}, path))
    encoder.to(memory_format=layout_before)  # the model as it came (training may run the encoder)
    store = FeatureStore(folder)
    logger.info(
        "Cached encoder features of %d images, %s %s, in %d shard(s) at %s",
        len(store),
        store.feature_shape,
        dtype,
        store.num_shards,
        folder,
    )
    return store


def _mention_old_caches(cache_dir: Path) -> None:
    """Single-file caches of hf-captioner before the store (`<key>.safetensors`) are never read now: say so, once."""
    old = sorted(cache_dir.glob("*.safetensors")) if cache_dir.is_dir() else []
    if old:
        size = sum(path.stat().st_size for path in old) / 1e9
        logger.warning(
            "%s holds %d feature cache file(s) of an older hf-captioner that are no longer read (%.1f GB, "
            "e.g. %s): delete them to free the space",
            cache_dir,
            len(old),
            size,
            old[0].name,
        )


def _write_atomically(path: Path, write) -> None:
    """Write to a partial file named by this process, then rename: the file exists only complete."""
    partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
    write(partial)
    os.replace(partial, path)


def _remove_abandoned_partials(folder: Path) -> None:
    """Partial files of killed runs (their process is gone); a live caching run's own are left alone."""
    for partial in folder.glob("*.partial"):
        pid = partial.name.split(".")[-2]
        if not (pid.isdigit() and _process_alive(int(pid))):
            partial.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _image_bytes(feature_shape: list[int], dtype: str) -> int:
    return math.prod(feature_shape) * STORE_DTYPES[dtype].itemsize


def _check_free_space(folder: Path, layout: dict, shards_to_write: int) -> None:
    """Refuse at once, naming the sizes, rather than fill the disk half-way through a long caching run."""
    needed = shards_to_write * layout["shard_size"] * _image_bytes(layout["feature_shape"], layout["dtype"])
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise OSError(
            f"the feature store at {folder} needs {needed / 1e9:.1f} GB more and the disk has "
            f"{free / 1e9:.1f} GB free: free space, set feature_cache_dir to another disk, or store "
            "bfloat16 features (feature_cache_dtype)"
        )
