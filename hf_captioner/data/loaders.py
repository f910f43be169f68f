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
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from PIL import Image

from ..processing_captioner import UNREADABLE_IMAGE_ERRORS
from ..tokenization import normalize_caption

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
SPLIT_ALIASES = {
    "train": "train",
    "restval": "train",
    "val": "validation",
    "dev": "validation",
    "validation": "validation",
    "valid": "validation",
    "test": "test",
}
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
    try:
        return _read_captions_csv(csv_path, images_dir, split_fractions, seed, strict)
    except UnicodeDecodeError:
        raise DataError(
            f"{csv_path}: not a UTF-8 text file, so not an image,caption CSV (parquet and arrow files "
            "are read by their .parquet / .arrow suffix)"
        ) from None


def _read_captions_csv(csv_path: Path, images_dir: Path, split_fractions, seed: int, strict):
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


@dataclass(frozen=True)
class HubLayout:
    """Where a Hub caption data set keeps its pictures, captions and splits.

    image_column: pictures (an image feature, bytes, or a path / file name, found under `images_dir`);
    caption_columns: one column of strings (one row per caption), one of lists (one row per image), or several
        (e.g. caption_0..caption_4), all of a row's captions kept;
    id_column: groups the rows of one picture (default: the picture's path or bytes);
    split_column: a column naming each row's split, for data sets published as one Hub split;
    split_names: a Hub split or split-column value -> train / validation / test (restval, val, dev are known);
    image_folder_column: a column naming the picture's folder under `images_dir` (COCO: train2014 / val2014).
    """

    image_column: str = "image"
    caption_columns: tuple[str, ...] = ("caption",)
    id_column: str | None = None
    split_column: str | None = None
    split_names: Mapping[str, str] = field(default_factory=dict)
    image_folder_column: str | None = None


# Layouts of captioning data sets on the Hub, picked up by name (`--data jxie/flickr8k`); any field can be overridden.
HUB_LAYOUTS = {
    "jxie/flickr8k": HubLayout(caption_columns=tuple(f"caption_{i}" for i in range(5))),
    # one Hub split ("test") holding all 31,783 pictures, the Karpathy split in a column
    "nlphuji/flickr30k": HubLayout(caption_columns=("caption",), id_column="img_id", split_column="split"),
    # file names only: the COCO pictures come from a local folder (`images_dir`/train2014/..., /val2014/...)
    "yerevann/coco-karpathy": HubLayout(
        image_column="filename",
        caption_columns=("sentences",),
        id_column="cocoid",
        split_column="split",
        image_folder_column="filepath",
    ),
}


LAYOUT_FIELDS = ("image_column", "caption_columns", "id_column", "split_column", "split_names", "image_folder_column")


def hub_layout(name: str, settings: Mapping | None = None) -> HubLayout:
    """The preset layout of `name`, or of the Hub data set `settings["data_preset"]` names (a local copy of one), else
    the default layout, with the fields `settings` sets (not None) replaced: a run's arguments or its
    training_args.json (split_names there as FROM=TO strings)."""
    settings = settings or {}
    name = settings.get("data_preset") or name
    given = {key: settings[key] for key in LAYOUT_FIELDS if settings.get(key) is not None}
    if "caption_columns" in given:
        given["caption_columns"] = tuple(given["caption_columns"])
    if "split_names" in given and not isinstance(given["split_names"], Mapping):
        given["split_names"] = dict(item.split("=", 1) for item in given["split_names"])
    return replace(HUB_LAYOUTS.get(name.lower(), HubLayout()), **given)


def _caption_texts(value) -> list:
    """A caption cell: a string, a {"raw": ...} record (COCO-style sentences), or a list of either."""
    if isinstance(value, Mapping):
        value = value.get("raw")
    if isinstance(value, (list, tuple)):
        return [text for item in value for text in _caption_texts(item)]
    return [] if value is None else [value]


def _hub_picture(value, folder, images_dir: Path | None, source: str):
    """A picture cell -> a `datasets.Image` dict (path/bytes) or a file to check, found under `images_dir`."""
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value), "path": None}
    if isinstance(value, Mapping):
        return dict(value)
    path = Path(str(value))
    if path.is_absolute() or images_dir is None:
        if images_dir is None and not path.is_file():
            raise DataError(
                f"{source}: its pictures are file names ({value!r}); pass images_dir (--images_dir), "
                "the folder that holds them"
            )
        return path
    return images_dir / str(folder) / path if folder is not None else images_dir / path


def load_hub_dataset(
    name: str,
    images_dir: str | os.PathLike | None = None,
    strict: bool | Collection[str] = False,
    layout: HubLayout | None = None,
    load_kwargs: Mapping | None = None,
):
    """A data set from the Hub (or any `datasets.load_dataset` path), read through `layout` (default: the preset for
    `name`, see `HUB_LAYOUTS`, or `HubLayout()`). Every caption column of a row is kept; rows of one picture are
    grouped; splits come from the split column when there is one, else from the Hub splits."""
    from datasets import load_dataset

    return read_datasets_layout(load_dataset(name, **(load_kwargs or {})), name, images_dir, strict, layout)


def read_datasets_layout(
    loaded: Mapping,
    name: str,
    images_dir: str | os.PathLike | None = None,
    strict: bool | Collection[str] = False,
    layout: HubLayout | None = None,
):
    """`datasets` splits (a `DatasetDict`, from the Hub or a local copy) -> the normalised schema, read through
    `layout` (see `load_hub_dataset`)."""
    from datasets import Image as ImageFeature

    layout = layout or hub_layout(name)
    report = LoadReport(name)
    images_dir = Path(images_dir) if images_dir is not None else None
    grouped: dict[tuple[str, str], dict] = {}
    for hub_split, dataset in loaded.items():
        wanted = (
            layout.image_column,
            *layout.caption_columns,
            layout.id_column,
            layout.split_column,
            layout.image_folder_column,
        )
        missing = [column for column in wanted if column and column not in dataset.column_names]
        if missing:
            raise DataError(
                f"{name} split {hub_split!r} has no column(s) {missing}; it has {dataset.column_names} "
                "(set image_column / caption_columns / split_column to fit)"
            )
        if isinstance(dataset.features[layout.image_column], ImageFeature):
            dataset = dataset.cast_column(layout.image_column, ImageFeature(decode=False))
        for index, row in enumerate(dataset):
            raw_split = row[layout.split_column] if layout.split_column else hub_split
            split = _split_name(layout.split_names.get(raw_split, raw_split), name)
            folder = row[layout.image_folder_column] if layout.image_folder_column else None
            image = _hub_picture(row[layout.image_column], folder, images_dir, name)
            if layout.id_column:
                key = str(row[layout.id_column])
            elif isinstance(image, Path):
                key = str(image)
            else:
                key = image.get("path") or f"{hub_split}-{index}"
            captions = [text for column in layout.caption_columns for text in _caption_texts(row[column])]
            entry = grouped.setdefault((split, key), {"image": image, "captions": []})
            entry["captions"].extend(captions)
    rows = ((split, Path(key).stem, e["image"], e["captions"]) for (split, key), e in grouped.items())
    return build_dataset_dict(rows, report, strict)


def detect_and_load(
    source: str | os.PathLike,
    images_dir: str | os.PathLike | None = None,
    strict: bool | Collection[str] = False,
    layout: HubLayout | None = None,
    **kwargs,
):
    """A folder or file in any supported layout, recognised by its files; anything else is a Hub data set name,
    read through `layout` (default: its preset, see `HUB_LAYOUTS`). `strict`: True, or the names of the splits
    whose missing or unreadable images are errors (see `LoadReport`)."""
    path = Path(source)
    local_copy = load_local_datasets_copy(path)  # save_to_disk folders, parquet / arrow files and folders of them
    if local_copy is not None:
        return read_datasets_layout(local_copy, str(path), images_dir, strict, layout)
    if path.is_file():
        if path.suffix == ".json":
            return load_karpathy_json(path, images_dir or path.parent / "images", strict=strict)
        if path.name == "Flickr8k.token.txt":
            return load_flickr8k_text(path.parent, images_dir, strict=strict)
        return load_captions_csv(path, images_dir, strict=strict, **kwargs)
    if path.is_dir():
        karpathy = [p for p in sorted(path.glob("dataset_*.json")) if p.name not in DATASETS_LIBRARY_FILES]
        if karpathy:
            return load_karpathy_json(karpathy[0], images_dir or path / "images", strict=strict)
        if (path / "Flickr8k.token.txt").is_file():
            return load_flickr8k_text(path, images_dir, strict=strict)
        if (path / "captions.txt").is_file():
            return load_captions_csv(path / "captions.txt", images_dir, strict=strict, **kwargs)
        raise DataError(
            f"{path} holds no known caption layout (dataset_*.json, Flickr8k.token.txt, captions.txt, "
            "parquet / arrow files, or a datasets save_to_disk folder)"
        )
    if not is_hub_name(source):
        raise DataError(f"Data source not found: {source}")
    return load_hub_dataset(str(source), images_dir, strict, layout, load_kwargs=kwargs)


DATASETS_LIBRARY_FILES = ("dataset_dict.json", "dataset_info.json")  # save_to_disk's, not Karpathy's dataset_*.json
DATASETS_FILE_FORMATS = {".parquet": "parquet", ".arrow": "arrow"}


def load_local_datasets_copy(path: Path):
    """A local copy of a Hub data set as `datasets` splits, or None when `path` is none: a `save_to_disk` folder, a
    folder of parquet or arrow files (splits from their names, as the Hub names them: data/train-00000-of-00001...)
    and none of the text layouts' files, or one such file (a single "train" split; a split column can divide it)."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    if path.is_dir() and any((path / name).is_file() for name in ("dataset_dict.json", "state.json")):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file() and path.suffix in DATASETS_FILE_FORMATS:
        return load_dataset(DATASETS_FILE_FORMATS[path.suffix], data_files={"train": str(path)})
    text_layouts = ("Flickr8k.token.txt", "captions.txt")
    if (
        path.is_dir()
        and not any((path / name).is_file() for name in text_layouts)
        and not any(p.name not in DATASETS_LIBRARY_FILES for p in path.glob("dataset_*.json"))
    ):
        suffixes = {p.suffix for p in path.rglob("*") if not p.name.startswith(".")}
        formats = {DATASETS_FILE_FORMATS[suffix] for suffix in suffixes & set(DATASETS_FILE_FORMATS)}
        if len(formats) == 1:
            return load_dataset(formats.pop(), data_dir=str(path))
    return None


SAMPLE_FILE = "dataset_sample.json"  # what `write_sample_dataset` (make-sample-data) writes beside the pictures


def data_source(source: str | os.PathLike) -> str:
    """What `--data` is, judged where the run starts (the model card reads it later, elsewhere): "sample" (drawn in
    memory, or a folder or file that make-sample-data wrote), "hub" (a Hub data set id) or "local"."""
    path = Path(source)
    if str(source) == "sample" or (path / SAMPLE_FILE).is_file() or path.name == SAMPLE_FILE:
        return "sample"
    return "hub" if is_hub_name(source) else "local"


def is_hub_name(source: str | os.PathLike) -> bool:
    """Whether `--data` names a Hub data set: nothing on disk by that name and not written as a path."""
    text = str(source)
    if text == "sample" or Path(text).exists():
        return False
    return not text.startswith((".", "/", "~")) and text.count("/") <= 1
