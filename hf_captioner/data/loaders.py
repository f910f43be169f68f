"""Caption data sets from every common source, in one schema.

Every loader returns a `datasets.DatasetDict` with splits `train`, `validation`, `test` and columns `image`
(`datasets.Image`), `captions` (list of strings, normalised) and `image_id`. Listed images that are missing or
unreadable are skipped and counted in a warning (or, with `strict=True`, raise); empty captions are dropped and
counted the same way.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from collections import defaultdict
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..processing_captioner import UNREADABLE_IMAGE_ERRORS
from ..tokenization import normalize_caption

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {"train": "train", "restval": "train", "val": "validation", "dev": "validation",
                 "validation": "validation", "valid": "validation", "test": "test"}  # fmt: skip
FLICKR8K_SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "validation": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}


class DataError(ValueError):
    """A data source that cannot be read as asked (missing or malformed file, or a skip under `strict`)."""


@dataclass
class LoadReport:
    """What a loader skipped, so that nothing is lost silently."""

    source: str
    missing_images: list[str] = field(default_factory=list)
    unreadable_images: list[str] = field(default_factory=list)
    empty_captions: int = 0
    images_without_captions: list[str] = field(default_factory=list)
    duplicate_entries: list[str] = field(default_factory=list)  # an image listed twice in one split
    train_images_also_evaluated: list[str] = field(default_factory=list)  # dropped from train: scores stay honest
    notes: list[str] = field(default_factory=list)
    splits_with_skips: set[str] = field(default_factory=set)  # the splits that lost an image

    def finish(self, strict: bool | Collection[str]) -> None:
        """Warn once about every kind of skip, naming a few. `strict`: True makes any skipped image an error; a
        collection of split names, only those of these splits (e.g. the one split being evaluated)."""
        problems = []
        for label, names in (
            ("missing on disk", self.missing_images),
            ("unreadable", self.unreadable_images),
            ("without any caption", self.images_without_captions),
            ("listed twice in one split (later entries)", self.duplicate_entries),
            ("of train also in validation or test (dropped from train)", self.train_images_also_evaluated),
        ):
            if names:
                problems.append(f"{len(names)} image(s) {label} (e.g. {', '.join(names[:3])})")
        if self.empty_captions:
            problems.append(f"{self.empty_captions} empty caption(s) dropped")
        for note in self.notes:
            logger.info("%s: %s", self.source, note)
        if not problems:
            return
        message = f"{self.source}: skipped " + "; ".join(problems)
        strict_splits = set(SPLITS) if strict is True else set(strict or ())
        if self.splits_with_skips & strict_splits:
            raise DataError(message + " (strict mode)")
        logger.warning(message)


def _readable(path: Path) -> bool:
    """Whether the picture decodes: `verify()` alone passes truncated JPEGs, so its data is decoded (JPEG at 1/8
    scale, which still reads every byte: 0.3 ms for a 224 px Flickr picture); decompression bombs fail here."""
    try:
        with Image.open(path) as image:
            image.draft(image.mode, (1, 1))
            image.load()
        return True
    except UNREADABLE_IMAGE_ERRORS:
        return False


def build_dataset_dict(
    rows: Iterable[tuple[str, str, Path | dict, list[str]]], report: LoadReport, strict: bool | Collection[str] = False
):
    """(split, image_id, image, raw captions) rows -> the normalised `DatasetDict`, skipping and counting.

    `image` is a file path (checked: present and readable) or a `datasets.Image` dict of path/bytes from the Hub.
    """
    from datasets import Dataset, DatasetDict, Features, Image, Sequence, Value

    rows = list(rows)

    def identity(image_id: str, image) -> str:  # the file for pictures on disk (two ids may name one file)
        return str(Path(image).resolve()) if isinstance(image, Path) else image_id

    splits_of = defaultdict(set)
    for split, image_id, image, _ in rows:
        splits_of[identity(image_id, image)].add(split)
    seen = set()
    columns = {split: {"image": [], "captions": [], "image_id": []} for split in SPLITS}
    for split, image_id, image, captions in rows:
        key = identity(image_id, image)
        if split == "train" and len(splits_of[key]) > 1:  # training on an evaluated picture inflates its scores
            report.train_images_also_evaluated.append(image_id)
            report.splits_with_skips.add(split)
            continue
        if (split, key) in seen:
            report.duplicate_entries.append(image_id)
            report.splits_with_skips.add(split)
            continue
        seen.add((split, key))
        cleaned = [normalize_caption(c) for c in captions if isinstance(c, str)]
        report.empty_captions += len(captions) - sum(1 for c in cleaned if c)
        cleaned = [c for c in cleaned if c]
        if not cleaned:
            report.images_without_captions.append(image_id)
            report.splits_with_skips.add(split)
            continue
        if isinstance(image, Path):
            if not image.is_file():
                report.missing_images.append(str(image))
                report.splits_with_skips.add(split)
                continue
            if not _readable(image):
                report.unreadable_images.append(str(image))
                report.splits_with_skips.add(split)
                continue
            image = str(image)
        columns[split]["image"].append(image)
        columns[split]["captions"].append(cleaned)
        columns[split]["image_id"].append(image_id)
    report.finish(strict)
    features = Features({"image": Image(), "captions": Sequence(Value("string")), "image_id": Value("string")})
    return DatasetDict({split: Dataset.from_dict(columns[split], features=features) for split in SPLITS})


def _split_name(raw: str, source: str) -> str:
    split = SPLIT_ALIASES.get(str(raw).lower())
    if split is None:
        raise DataError(f"{source}: unknown split name {raw!r} (expected one of {sorted(SPLIT_ALIASES)})")
    return split


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} not found: {path}")
    return path


def load_karpathy_json(
    json_path: str | os.PathLike, images_dir: str | os.PathLike, strict: bool | Collection[str] = False
):
    """Karpathy's `dataset_flickr8k.json` / `dataset_flickr30k.json` (or `dataset_coco.json`); restval -> train."""
    json_path, images_dir = _require_file(Path(json_path), "Karpathy split file"), Path(images_dir)
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))["images"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{json_path} is not a Karpathy split file with an 'images' list: {err}") from None
    report = LoadReport(str(json_path))

    def rows():
        for i, entry in enumerate(entries):
            try:
                filename, split = entry["filename"], _split_name(entry["split"], str(json_path))
                captions = [s.get("raw") or " ".join(s.get("tokens", [])) for s in entry["sentences"]]
            except (KeyError, TypeError, AttributeError) as err:
                raise DataError(f"{json_path}: entry {i} lacks filename/split/sentences ({err})") from None
            folder = images_dir / entry["filepath"] if entry.get("filepath") else images_dir
            path = folder / filename if (folder / filename).exists() else images_dir / filename
            yield split, Path(filename).stem, path, captions

    return build_dataset_dict(rows(), report, strict)


def read_flickr8k_token_file(token_path: Path, report: LoadReport) -> dict[str, list[str]]:
    """`<image>.jpg#<n>\\t<caption>` lines -> captions per image file name (order kept)."""
    captions: dict[str, list[str]] = defaultdict(list)
    with open(token_path, encoding="utf-8", newline=None) as handle:
        for number, line in enumerate(handle, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            name, hash_sign, index = key.rpartition("#")
            if not tab or not hash_sign or not index.isdigit():
                raise DataError(f"{token_path}:{number}: expected '<image>#<n>\\t<caption>', got {line[:80]!r}")
            captions[name].append(caption)
    return captions


def load_flickr8k_text(
    folder: str | os.PathLike, images_dir: str | os.PathLike | None = None, strict: bool | Collection[str] = False
):
    """The original Flickr8k files: `Flickr8k.token.txt` and `Flickr_8k.{train,dev,test}Images.txt`."""
    folder = Path(folder)
    images_dir = Path(images_dir) if images_dir is not None else folder / "Flicker8k_Dataset"
    token_path = _require_file(folder / "Flickr8k.token.txt", "Flickr8k caption file")
    report = LoadReport(str(token_path))
    captions = read_flickr8k_token_file(token_path, report)
    split_of: dict[str, str] = {}
    for split, name in FLICKR8K_SPLIT_FILES.items():
        split_path = _require_file(folder / name, f"Flickr8k {split} split file")
        for line in split_path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                split_of[line.strip()] = split
    unlisted = sorted(set(captions) - set(split_of))
    if unlisted:
        report.notes.append(f"{len(unlisted)} caption key(s) belong to no split and are left out (e.g. {unlisted[:3]})")

    def rows():
        for name, split in split_of.items():
            yield split, Path(name).stem, images_dir / name, captions.get(name, [])

    return build_dataset_dict(rows(), report, strict)


def load_captions_csv(
    csv_path: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    split_fractions: tuple[float, float] = (0.1, 0.1),
    seed: int = 0,
    strict: bool | Collection[str] = False,
):
    """The `captions.txt` layout: a CSV with `image,caption` rows and an `Images/` folder.

    It carries no split, so images are split at random (seeded): `split_fractions` = (validation, test).
    """
    csv_path = _require_file(Path(csv_path), "captions CSV")
    images_dir = Path(images_dir) if images_dir is not None else csv_path.parent / "Images"
    report = LoadReport(str(csv_path))
    captions: dict[str, list[str]] = defaultdict(list)
    with open(csv_path, encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "caption"} <= {f.strip() for f in reader.fieldnames}:
            raise DataError(
                f"{csv_path}: expected a header with 'image' and 'caption' columns, got {reader.fieldnames}"
            )
        for row in reader:
            row = {k.strip(): v for k, v in row.items() if k is not None}
            captions[row["image"].strip()].append(row["caption"] or "")
    names = sorted(captions)
    random.Random(seed).shuffle(names)
    n_val, n_test = (round(fraction * len(names)) for fraction in split_fractions)
    split_of = {name: "validation" for name in names[:n_val]}
    split_of.update({name: "test" for name in names[n_val : n_val + n_test]})

    def rows():
        for name in sorted(captions):
            yield split_of.get(name, "train"), Path(name).stem, images_dir / name, captions[name]

    return build_dataset_dict(rows(), report, strict)


def load_hub_dataset(
    name: str,
    image_column: str = "image",
    caption_column: str = "caption",
    id_column: str | None = None,
    split_column: str | None = None,
    split_names: dict[str, str] | None = None,
    strict: bool | Collection[str] = False,
    **load_kwargs,
):
    """A data set from the Hub (or any `datasets.load_dataset` path), one row per image or one per caption.

    `caption_column` may hold a string (one row per caption: rows of the same image are grouped, by `id_column`
    or else by the image's path/bytes) or a list of strings. Splits come from the data set's own splits, renamed
    through `split_names` (e.g. {"dev": "validation"}), or from `split_column` when everything is in one split.
    """
    from datasets import Image as ImageFeature
    from datasets import load_dataset

    loaded = load_dataset(name, **load_kwargs)
    report = LoadReport(name)
    grouped: dict[tuple[str, str], dict] = {}
    for hub_split, dataset in loaded.items():
        missing = [
            c for c in (image_column, caption_column, id_column, split_column) if c and c not in dataset.column_names
        ]
        if missing:
            raise DataError(f"{name} split {hub_split!r} has no column(s) {missing}; it has {dataset.column_names}")
        dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        for index, row in enumerate(dataset):
            raw_split = row[split_column] if split_column else (split_names or {}).get(hub_split, hub_split)
            split = _split_name(raw_split, name)
            image = row[image_column]
            key = str(row[id_column]) if id_column else (image.get("path") or f"{hub_split}-{index}")
            captions = row[caption_column]
            captions = [captions] if isinstance(captions, str) else list(captions or [])
            entry = grouped.setdefault((split, key), {"image": image, "captions": []})
            entry["captions"].extend(captions)
    rows = ((split, Path(key).stem, e["image"], e["captions"]) for (split, key), e in grouped.items())
    return build_dataset_dict(rows, report, strict)


def detect_and_load(
    source: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    strict: bool | Collection[str] = False,
    **kwargs,
):
    """A folder or file in any supported layout, recognised by its files; anything else is a Hub data set name.
    `strict`: True, or the names of the splits whose missing or unreadable images are errors (see `LoadReport`)."""
    path = Path(source)
    if path.is_file():
        if path.suffix == ".json":
            return load_karpathy_json(path, images_dir or path.parent / "images", strict=strict)
        if path.name == "Flickr8k.token.txt":
            return load_flickr8k_text(path.parent, images_dir, strict=strict)
        return load_captions_csv(path, images_dir, strict=strict, **kwargs)
    if path.is_dir():
        karpathy = sorted(path.glob("dataset_*.json"))
        if karpathy:
            return load_karpathy_json(karpathy[0], images_dir or path / "images", strict=strict)
        if (path / "Flickr8k.token.txt").is_file():
            return load_flickr8k_text(path, images_dir, strict=strict)
        if (path / "captions.txt").is_file():
            return load_captions_csv(path / "captions.txt", images_dir, strict=strict, **kwargs)
        raise DataError(f"{path} holds no known caption layout (dataset_*.json, Flickr8k.token.txt or captions.txt)")
    if str(source).startswith((".", "/", "~")) or str(source).count("/") > 1:  # a local path, not a Hub name
        raise DataError(f"Data source not found: {source}")
    return load_hub_dataset(str(source), strict=strict, **kwargs)
