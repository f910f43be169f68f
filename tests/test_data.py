"""Loaders in every format give the same normalised rows; skips are counted; the sample data set is sound."""

import json
import logging

import numpy as np
import pytest
from conftest import write_bomb_png, write_truncated_jpeg
from datasets import Dataset
from PIL import Image

from hf_captioner.arguments import parse_arguments
from hf_captioner.data import (
    HUB_LAYOUTS,
    DataError,
    HubLayout,
    detect_and_load,
    hub_layout,
    load_captions_csv,
    load_flickr8k_text,
    load_hub_dataset,
    load_karpathy_json,
    make_sample_dataset,
    write_sample_dataset,
)
from hf_captioner.data.pairs import EpochShuffleSampler
from hf_captioner.data.sample import COLOURS, KINDS

# image name -> (split, raw captions); raw captions carry the usual mess: case, spaces, an empty one
FIXTURE = {
    "1000_a.jpg": ("train", ["A dog runs .", "  a DOG   running", "the dog is fast"]),
    "1001_b.jpg": ("train", ["Two kids play", "kids playing outside", ""]),
    "1002_c.jpg": ("train", ["a red car", "A car that is red"]),
    "1003_d.jpg": ("validation", ["a man rides a bike", "cyclist on a road"]),
    "1004_e.jpg": ("test", ["a cat sleeps", "a sleeping cat"]),
}
EXPECTED = {  # image_id -> normalised captions
    "1000_a": ["a dog runs .", "a dog running", "the dog is fast"],
    "1001_b": ["two kids play", "kids playing outside"],
    "1002_c": ["a red car", "a car that is red"],
    "1003_d": ["a man rides a bike", "cyclist on a road"],
    "1004_e": ["a cat sleeps", "a sleeping cat"],
}
SPLIT_FILE_NAMES = {"train": "trainImages", "validation": "devImages", "test": "testImages"}


def write_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(FIXTURE):
        Image.new("RGB", (20, 16), (40 * i, 100, 200)).save(folder / name)
    return folder


def rows(data) -> dict:
    return {row["image_id"]: row["captions"] for split in data for row in data[split]}


def splits(data) -> dict:
    return {row["image_id"]: split for split in data for row in data[split]}


@pytest.fixture
def karpathy(tmp_path):
    write_images(tmp_path / "images")
    names = {"train": "train", "validation": "val", "test": "test"}
    entries = [
        {"filename": name, "split": names[split], "sentences": [{"raw": c, "tokens": c.split()} for c in caps]}
        for name, (split, caps) in FIXTURE.items()
    ]
    entries[2]["split"] = "restval"  # Karpathy's extra training images
    (tmp_path / "dataset_flickr8k.json").write_text(json.dumps({"images": entries}))
    return tmp_path


@pytest.fixture
def flickr8k_text(tmp_path):
    write_images(tmp_path / "Flicker8k_Dataset")
    lines = [f"{name}#{i}\t{c}" for name, (_, caps) in FIXTURE.items() for i, c in enumerate(caps)]
    lines.append("1004_e.jpg.1#0\ta stray key like the real file's")  # the real file has such a key
    (tmp_path / "Flickr8k.token.txt").write_bytes(("\r\n".join(lines) + "\r\n").encode())  # CRLF, as distributed
    for split, suffix in SPLIT_FILE_NAMES.items():
        names = [name for name, (s, _) in FIXTURE.items() if s == split]
        (tmp_path / f"Flickr_8k.{suffix}.txt").write_text("\n".join(names) + "\n")
    return tmp_path


@pytest.fixture
def captions_csv(tmp_path):
    write_images(tmp_path / "Images")
    lines = ["image,caption"] + [f'{name},"{c}"' for name, (_, caps) in FIXTURE.items() for c in caps]
    (tmp_path / "captions.txt").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_every_format_gives_the_same_normalised_rows(karpathy, flickr8k_text, captions_csv, tmp_path):
    from_karpathy = load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images")
    from_text = load_flickr8k_text(flickr8k_text)
    from_csv = load_captions_csv(captions_csv / "captions.txt", split_fractions=(0.2, 0.2))
    for data in (from_karpathy, from_text, from_csv):
        assert set(data) == {"train", "validation", "test"}
        assert rows(data) == EXPECTED
        assert isinstance(data["train"][0]["image"], Image.Image)
    expected_splits = {name.split(".")[0]: split for name, (split, _) in FIXTURE.items()}
    assert splits(from_karpathy) == expected_splits  # restval folded into train
    assert splits(from_text) == expected_splits
    assert sorted(splits(from_csv).values()).count("train") == 3  # CSV: seeded random split, 20% / 20%
    assert rows(detect_and_load(karpathy)) == rows(detect_and_load(flickr8k_text)) == EXPECTED


@pytest.mark.parametrize("layout", ["per_caption", "per_image"])
def test_hub_style_data_sets_are_grouped_and_split(tmp_path, layout):
    write_images(tmp_path / "img")
    if layout == "per_caption":  # one row per caption, the data set's own splits (with a "dev" name)
        for split in ("train", "dev", "test"):
            wanted = {"train": "train", "dev": "validation", "test": "test"}[split]
            table = [(n, c) for n, (s, caps) in FIXTURE.items() if s == wanted for c in caps]
            Dataset.from_dict(
                {"image": [str(tmp_path / "img" / n) for n, _ in table], "sentence": [c for _, c in table]}
            ).to_parquet(str(tmp_path / f"{split}.parquet"))
        files = {s: str(tmp_path / f"{s}.parquet") for s in ("train", "dev", "test")}
        layout = HubLayout(caption_columns=("sentence",), split_names={"dev": "validation"})
        data = load_hub_dataset("parquet", layout=layout, load_kwargs={"data_files": files})
    else:  # one row per image, captions as a list, everything in one split with a split column
        names = list(FIXTURE)
        Dataset.from_dict(
            {
                "image": [str(tmp_path / "img" / n) for n in names],
                "captions": [FIXTURE[n][1] for n in names],
                "which": [FIXTURE[n][0] for n in names],
            }
        ).to_parquet(str(tmp_path / "all.parquet"))
        data = load_hub_dataset(
            "parquet",
            layout=HubLayout(caption_columns=("captions",), split_column="which"),
            load_kwargs={"data_files": {"train": str(tmp_path / "all.parquet")}},
        )
    assert rows(data) == EXPECTED
    assert splits(data) == {name.split(".")[0]: split for name, (split, _) in FIXTURE.items()}
    with pytest.raises(DataError, match=r"no column\(s\) \['nope'\]; it has \['image', "):
        load_hub_dataset(
            "parquet",
            layout=HubLayout(caption_columns=("nope",)),
            load_kwargs={"data_files": {"train": str(next(tmp_path.glob("*.parquet")))}},
        )


def image_bytes(folder, name) -> dict:
    return {"bytes": (folder / name).read_bytes(), "path": name}


def test_the_jxie_flickr8k_layout_keeps_all_five_references(tmp_path):
    """Stand-in for jxie/flickr8k: an image feature and caption_0 ... caption_4, the splits as Hub splits."""
    from datasets import Features, Value
    from datasets import Image as ImageFeature

    folder = write_images(tmp_path / "img")
    features = Features({"image": ImageFeature(), **{f"caption_{i}": Value("string") for i in range(5)}})
    files = {}
    for split in ("train", "validation", "test"):
        names = [n for n, (s, _) in FIXTURE.items() if s == split]
        columns = {"image": [image_bytes(folder, n) for n in names]}
        for i in range(5):  # fewer than five captions: the rest are empty, counted and dropped
            columns[f"caption_{i}"] = [(FIXTURE[n][1] + [""] * 5)[i] for n in names]
        files[split] = str(tmp_path / f"{split}.parquet")
        Dataset.from_dict(columns, features=features).to_parquet(files[split])
    data = load_hub_dataset("parquet", layout=HUB_LAYOUTS["jxie/flickr8k"], load_kwargs={"data_files": files})
    assert rows(data) == EXPECTED and splits(data) == {n.split(".")[0]: s for n, (s, _) in FIXTURE.items()}
    assert hub_layout("jxie/flickr8k") == HUB_LAYOUTS["jxie/flickr8k"]  # picked up by name from --data
    assert hub_layout("jxie/flickr8k", {"caption_columns": ["caption_0"]}).caption_columns == ("caption_0",)


def test_the_nlphuji_flickr30k_layout_splits_by_its_column_and_keeps_train_out_of_test(tmp_path):
    """Stand-in for nlphuji/flickr30k: everything in one Hub split called "test", the Karpathy split in a column."""
    folder = write_images(tmp_path / "img")
    names = list(FIXTURE)
    karpathy = {"train": "train", "validation": "val", "test": "test"}
    Dataset.from_dict(
        {
            "image": [image_bytes(folder, n) for n in names],
            "caption": [FIXTURE[n][1] for n in names],
            "sentids": [[str(i)] for i in range(len(names))],
            "split": [karpathy[FIXTURE[n][0]] for n in names],
            "img_id": [n.split(".")[0] for n in names],
            "filename": names,
        }
    ).to_parquet(str(tmp_path / "flickr30k.parquet"))
    files = {"test": str(tmp_path / "flickr30k.parquet")}
    data = load_hub_dataset("parquet", layout=HUB_LAYOUTS["nlphuji/flickr30k"], load_kwargs={"data_files": files})
    assert rows(data) == EXPECTED
    assert [row["image_id"] for row in data["test"]] == ["1004_e"]  # not every picture of the Hub's "test" split
    assert len(data["train"]) == 3 and len(data["validation"]) == 1
    plain = load_hub_dataset("parquet", layout=HubLayout(), load_kwargs={"data_files": files})
    assert len(plain["test"]) == len(names) and len(plain["train"]) == 0  # what the preset's split column prevents


def test_the_coco_karpathy_layout_finds_local_pictures_by_file_name(tmp_path):
    """Stand-in for yerevann/coco-karpathy: file names and folders only (the COCO pictures are local), restval
    counted as train, sentences as a list."""
    names = list(FIXTURE)
    subfolder = {"train": "train2014", "validation": "val2014", "test": "val2014"}
    for name in names:
        write_images(tmp_path / "coco" / subfolder[FIXTURE[name][0]])
    karpathy = {
        "1000_a.jpg": "restval",
        "1001_b.jpg": "train",
        "1002_c.jpg": "train",
        "1003_d.jpg": "val",
        "1004_e.jpg": "test",
    }
    Dataset.from_dict(
        {
            "filepath": [subfolder[FIXTURE[n][0]] for n in names],
            "filename": names,
            "sentences": [FIXTURE[n][1] for n in names],
            "split": [karpathy[n] for n in names],
            "cocoid": [n.split(".")[0] for n in names],
            "url": [f"http://example.org/{n}" for n in names],
        }
    ).to_parquet(str(tmp_path / "train.parquet"))
    files = {"train": str(tmp_path / "train.parquet")}
    layout = HUB_LAYOUTS["yerevann/coco-karpathy"]
    data = load_hub_dataset("parquet", tmp_path / "coco", layout=layout, load_kwargs={"data_files": files})
    assert rows(data) == EXPECTED and splits(data) == {n.split(".")[0]: s for n, (s, _) in FIXTURE.items()}
    with pytest.raises(DataError, match="pass images_dir"):
        load_hub_dataset("parquet", layout=layout, load_kwargs={"data_files": files})


def test_a_hub_layout_is_set_from_the_command_line(tmp_path, capsys):
    args = parse_arguments(
        [
            "--data",
            "jxie/flickr8k",
            "--caption_columns",
            "caption_0",
            "caption_1",
            "--split_names",
            "dev=validation",
            "--split_column",
            "which",
        ]
    )
    layout = hub_layout(args.data, vars(args))
    assert layout.caption_columns == ("caption_0", "caption_1") and layout.split_names == {"dev": "validation"}
    assert layout.split_column == "which" and layout.image_column == "image"
    with pytest.raises(SystemExit):
        parse_arguments(["--split_names", "dev:validation"])
    assert "split_names: expected FROM=TO" in capsys.readouterr().err


def test_missing_and_corrupt_images_and_empty_captions_are_counted(karpathy, caplog):
    (karpathy / "images" / "1001_b.jpg").unlink()
    (karpathy / "images" / "1002_c.jpg").write_bytes(b"not a jpeg at all")
    with caplog.at_level(logging.WARNING):
        data = load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images")
    assert set(rows(data)) == {"1000_a", "1003_d", "1004_e"}
    message = caplog.text
    assert "1 image(s) missing on disk" in message and "1001_b.jpg" in message
    assert "1 image(s) unreadable" in message and "1002_c.jpg" in message
    assert "1 empty caption(s) dropped" in message
    with pytest.raises(DataError, match="strict"):
        load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images", strict=True)


def test_duplicate_entries_and_evaluated_pictures_in_train_are_dropped_and_counted(karpathy, caplog):
    """A picture listed twice in a split counts once; a training picture that is also in validation or test leaves
    train (training on it would inflate the scores); both are said, and with strict they are errors."""
    path = karpathy / "dataset_flickr8k.json"
    listing = json.loads(path.read_text())
    by_name = {image["filename"]: image for image in listing["images"]}
    listing["images"].append(dict(by_name["1000_a.jpg"]))  # twice in train
    listing["images"].append({**by_name["1004_e.jpg"], "split": "train"})  # a test picture in train too
    path.write_text(json.dumps(listing))
    with caplog.at_level(logging.WARNING):
        data = load_karpathy_json(path, karpathy / "images")
    assert data["train"]["image_id"].count("1000_a") == 1 and "1004_e" not in data["train"]["image_id"]
    assert data["test"]["image_id"] == ["1004_e"]
    assert "1 image(s) listed twice in one split" in caplog.text
    assert "1 image(s) of train also in validation or test (dropped from train)" in caplog.text
    with pytest.raises(DataError, match="strict"):
        load_karpathy_json(path, karpathy / "images", strict=True)


def test_strict_can_be_about_some_splits_only(karpathy):
    """`hf-captioner evaluate --split test --strict` must not fail on a bad training picture."""
    split_of = {
        img["filename"]: img["split"] for img in json.loads((karpathy / "dataset_flickr8k.json").read_text())["images"]
    }
    broken = next(name for name, split in split_of.items() if split in ("train", "restval"))
    write_truncated_jpeg(karpathy / "images" / broken)
    data = load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images", strict=["test"])
    assert len(data["test"]) > 0
    with pytest.raises(DataError, match="strict mode") as error:
        load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images", strict=["train"])
    assert broken in str(error.value)


def test_truncated_and_bomb_images_are_counted_when_the_data_set_is_loaded(karpathy, caplog):
    write_truncated_jpeg(karpathy / "images" / "1003_d.jpg")
    write_bomb_png(karpathy / "images" / "1004_e.jpg")
    with caplog.at_level(logging.WARNING):
        data = load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images")
    assert set(rows(data)) == {"1000_a", "1001_b", "1002_c"}
    assert "2 image(s) unreadable" in caplog.text and "1003_d.jpg" in caplog.text and "1004_e.jpg" in caplog.text
    with pytest.raises(DataError, match="strict"):
        load_karpathy_json(karpathy / "dataset_flickr8k.json", karpathy / "images", strict=True)


def test_malformed_and_missing_files_get_clear_errors(tmp_path, flickr8k_text):
    with pytest.raises(DataError, match="not found"):
        load_karpathy_json(tmp_path / "nope.json", tmp_path)
    (tmp_path / "bad.json").write_text('{"something": []}')
    with pytest.raises(DataError, match="bad.json"):
        load_karpathy_json(tmp_path / "bad.json", tmp_path)
    token_file = flickr8k_text / "Flickr8k.token.txt"
    token_file.write_text(token_file.read_text() + "a line without a tab or key\n")
    with pytest.raises(DataError, match="Flickr8k.token.txt:14"):
        load_flickr8k_text(flickr8k_text)
    token_file.write_text("\n".join(token_file.read_text().splitlines()[:-1]) + "\n")
    (flickr8k_text / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DataError, match="validation split file"):
        load_flickr8k_text(flickr8k_text)
    (tmp_path / "captions.txt").write_text("file;text\nx;y\n")
    with pytest.raises(DataError, match="'image' and 'caption'"):
        load_captions_csv(tmp_path / "captions.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no known caption layout"):
        detect_and_load(tmp_path / "empty")
    with pytest.raises(DataError, match="not found"):
        detect_and_load("./no/such/folder")


def test_sample_data_set_is_deterministic_from_its_seed():
    first, again, other = (make_sample_dataset(6, 2, 2, seed=s) for s in (7, 7, 8))
    for split in first:
        assert first[split]["captions"] == again[split]["captions"]
        assert first[split]["objects"] == again[split]["objects"]
        for a, b in zip(first[split]["image"], again[split]["image"], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))
    assert first["train"]["captions"] != other["train"]["captions"]


def test_sample_boxes_match_the_drawn_shapes_and_captions_name_them():
    data = make_sample_dataset(60, 0, 0, seed=3)
    for row in data["train"]:
        pixels = np.asarray(row["image"]).astype(int)
        assert len(set(row["captions"])) >= 5
        kinds_present = {o["kind"] for o in row["objects"]}
        for caption in row["captions"]:
            named = {word for word in caption.split() if word in KINDS}
            assert named and named <= kinds_present, caption
        for obj in row["objects"]:
            near = (np.abs(pixels - np.array(COLOURS[obj["colour"]])) < 25).all(axis=-1)  # noise sigma is 4
            ys, xs = np.nonzero(near)
            x0, y0, x1, y1 = obj["box"]
            assert len(xs) > 20
            assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
            assert xs.min() - x0 <= 1 and x1 - xs.max() <= 1 and ys.min() - y0 <= 1 and y1 - ys.max() <= 1  # tight


def test_written_sample_data_set_round_trips_through_the_karpathy_loader(tmp_path):
    path = write_sample_dataset(tmp_path, 5, 2, 2, seed=1)
    loaded = detect_and_load(tmp_path)
    drawn = make_sample_dataset(5, 2, 2, seed=1)
    for split in drawn:
        assert loaded[split]["captions"] == drawn[split]["captions"]
        assert loaded[split]["image_id"] == drawn[split]["image_id"]
        assert np.array_equal(np.asarray(loaded[split][0]["image"]), np.asarray(drawn[split][0]["image"]))
    entries = json.loads(path.read_text())["images"]
    assert entries[0]["objects"] == drawn["train"][0]["objects"]


def test_the_epoch_order_is_a_seeded_permutation_and_can_keep_each_images_captions_together():
    sizes = np.array([5, 5, 3, 7, 5, 1])  # captions per image, their pair indices consecutive
    first_pair = np.cumsum(sizes) - sizes
    image_of = np.repeat(np.arange(len(sizes)), sizes)
    plain, grouped = EpochShuffleSampler(sizes.sum(), seed=3), EpochShuffleSampler(sizes.sum(), 3, sizes)
    for sampler in (plain, grouped):
        orders = []
        for epoch in (0, 1, 0):
            sampler.set_epoch(epoch)
            orders.append(list(sampler))
            assert sorted(orders[-1]) == list(range(sizes.sum()))
        assert orders[0] == orders[2] != orders[1]  # fixed by (seed, epoch): a resumed epoch replays its order
    for order in orders:  # grouped: each image's captions in a run of their own, in their order
        images = image_of[order]
        runs = [images[0], *(b for a, b in zip(images, images[1:], strict=False) if a != b)]
        assert sorted(runs) == list(range(len(sizes)))
        for image in range(len(sizes)):
            positions = np.flatnonzero(images == image)
            assert list(np.asarray(order)[positions]) == list(
                range(first_pair[image], first_pair[image] + sizes[image])
            )
    with pytest.raises(ValueError, match="add up to 26, not to the 25"):
        EpochShuffleSampler(25, 0, sizes)
