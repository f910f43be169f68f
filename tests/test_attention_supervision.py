"""Attention supervision from boxes: the target maps a training caption's words get (sample shapes, Flickr30k
Entities phrases), their way through the collator, and what supervision does to a trained model's pointing."""

import logging

import pytest
from conftest import tiny_arguments
from datasets import Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage
from transformers import AutoModel, AutoProcessor

from hf_captioner import train_tokenizer
from hf_captioner.arguments import SettingsError
from hf_captioner.data.grounding import GroundedCaptions, covered_cells, entity_phrases, shape_phrases
from hf_captioner.data.pairs import CaptionCollator, CaptionPairs
from hf_captioner.data.sample import make_sample_dataset, write_sample_dataset
from hf_captioner.evaluation import evaluate_split
from hf_captioner.processing_captioner import CaptionerImageProcessor, CaptionerProcessor
from hf_captioner.training import train

CAPTIONS = [["a black dog runs on the snow", "two dogs play"], ["a man in a red shirt climbs a rock"]]


@pytest.fixture(scope="module")
def processor():
    tokenizer = train_tokenizer([c for captions in CAPTIONS for c in captions] * 5, vocab_size=40, model_type="word")
    image_processor = CaptionerImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
    return CaptionerProcessor(image_processor, tokenizer)


def photos() -> Dataset:
    """Two 'photos' of 30 x 30 pixels (squashed copies, as the shared Flickr8k ones are) with their captions."""
    pictures = [PILImage.new("RGB", (30, 30), colour) for colour in ("white", "gray")]
    features = Features({"image": Image(), "captions": Sequence(Value("string")), "image_id": Value("string")})
    return Dataset.from_dict({"image": pictures, "captions": CAPTIONS, "image_id": ["dog", "man"]}, features=features)


ENTITIES = {  # Flickr30k Entities entries: original sizes, boxes in original pixels, phrases per caption
    "dog": {
        "width": 300,
        "height": 150,
        "boxes": {"1": [[0, 0, 99, 49]], "2": [[200, 100, 299, 149]]},
        "phrases": [[0, "1", "animals", "A black dog"], [0, "2", "scene", "the snow"], [1, "1", "animals", "Dogs"]],
    },
    "man": {
        "width": 90,
        "height": 90,
        "boxes": {"3": [[30, 30, 59, 59]]},
        "phrases": [[0, "3", "people", "A man"], [0, "0", "notvisual", "a rock"]],
    },
}


def targets_by_word(grounding, processor, dataset, row, caption):
    ids = processor.encode_captions([dataset[row]["captions"][caption]])[0]
    maps = grounding.maps(row, caption, len(ids))
    return {word: maps[steps[0]].nonzero().flatten().tolist() for word, steps in processor.words_of(ids)}


def test_entity_phrases_become_targets_on_the_cells_of_their_boxes(processor, caplog):
    """Boxes scale from the original picture to the squashed copy; each word of a matched phrase (not its article)
    gets the cells of its boxes; a phrase its caption does not contain ("Dogs" vs "two dogs" matches, a phrase of
    another wording does not) and an entity without boxes are skipped, counted in the log."""
    dataset = photos()
    ids = dataset["image_id"]
    with caplog.at_level(logging.INFO, logger="hf_captioner.data.grounding"):
        grounding = GroundedCaptions(
            dataset, processor, lambda row, size: entity_phrases(ENTITIES[ids[row]]), grid_size=3
        )
    first = targets_by_word(grounding, processor, dataset, 0, 0)
    assert first["black"] == first["dog"] == [0]  # the top-left third of the picture: cell 0
    assert first["snow"] == [8] and first["a"] == first["runs"] == first["the"] == []
    second = targets_by_word(grounding, processor, dataset, 0, 1)
    assert second["dogs"] == [0] and second["two"] == []
    third = targets_by_word(grounding, processor, dataset, 1, 0)
    assert third["man"] == [4] and third["rock"] == []  # "a rock" has no boxes
    assert (grounding.matched, grounding.unmatched) == (4, 0)
    ENTITIES["man"]["phrases"].append([0, "3", "people", "A climber"])  # Flickr30k's wording, not this caption's
    try:
        again = GroundedCaptions(dataset, processor, lambda row, size: entity_phrases(ENTITIES[ids[row]]), 3)
    finally:
        ENTITIES["man"]["phrases"].pop()
    assert (again.matched, again.unmatched) == (4, 1)
    assert "1 not found in the caption" in caplog.text or "not found" in caplog.text


def test_annotation_sentences_in_another_order_still_find_their_captions(processor):
    """Flickr30k lists an image's five sentences in another order than Flickr8k: phrase groups go to the caption that
    contains them, not to the caption of the same index."""
    dataset = photos()
    swapped = {name: {**entry, "phrases": [list(p) for p in entry["phrases"]]} for name, entry in ENTITIES.items()}
    for phrase in swapped["dog"]["phrases"]:
        phrase[0] = 1 - phrase[0]  # "A black dog" and "the snow" now under sentence 1, "Dogs" under sentence 0
    ids = dataset["image_id"]
    grounding = GroundedCaptions(dataset, processor, lambda row, size: entity_phrases(swapped[ids[row]]), 3)
    assert targets_by_word(grounding, processor, dataset, 0, 0)["dog"] == [0]
    assert targets_by_word(grounding, processor, dataset, 0, 1)["dogs"] == [0]
    assert (grounding.matched, grounding.unmatched) == (4, 0)


def test_a_box_between_cell_centres_still_gets_its_nearest_cell(processor):
    assert covered_cells([(0.0, 0.0, 0.1, 0.1)], 3, (30, 30), processor.image_processor).tolist() == [0]
    assert covered_cells([(0.0, 0.0, 1.0, 0.4)], 3, (30, 30), processor.image_processor).tolist() == [0, 1, 2]


def test_the_collator_carries_targets_in_the_order_of_its_labels(processor):
    """Captions are sorted longest first: each row's target map stays with its own caption."""
    dataset = photos()
    ids = dataset["image_id"]
    grounding = GroundedCaptions(dataset, processor, lambda row, size: entity_phrases(ENTITIES[ids[row]]), 3)
    pairs = CaptionPairs(dataset)
    items = [pairs[1], pairs[2], pairs[0]]  # "two dogs play", the man's caption, the black dog's
    batch = CaptionCollator(processor, grounding=grounding)(items)
    assert batch["attention_targets"].shape == (*batch["labels"].shape, 9)
    for labels, targets in zip(batch["labels"], batch["attention_targets"], strict=True):
        words = dict(processor.words_of(labels[labels != -100].tolist()))
        if "man" in words:
            assert targets[words["man"][0]].nonzero().flatten().tolist() == [4]
        elif "black" in words:
            assert targets[words["dog"][0]].nonzero().flatten().tolist() == [0]
        else:
            assert targets[words["dogs"][0]].nonzero().flatten().tolist() == [0]


def test_sample_shapes_give_their_colour_and_kind_words_the_shapes_cells():
    data = make_sample_dataset(12, 2, 2, seed=0, image_size=32)["train"]
    tokenizer = train_tokenizer([c for captions in data["captions"] for c in captions], 60, "word")
    image_processor = CaptionerImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CaptionerProcessor(image_processor, tokenizer)
    objects = data["objects"]
    grounding = GroundedCaptions(data, processor, lambda row, size: shape_phrases(objects[row], size), 4)
    assert grounding.unmatched == 0
    for row in range(len(data)):
        for caption in range(len(data[row]["captions"])):
            targets = targets_by_word(grounding, processor, data, row, caption)
            for shape in objects[row]:
                cells = covered_cells(shape_phrases([shape], (32, 32))[0].boxes, 4, (32, 32), image_processor)
                if targets.get(shape["kind"]) and len({s["kind"] for s in objects[row]}) == len(objects[row]):
                    assert set(cells) <= set(targets[shape["kind"]])
            assert targets["a"] == []


def test_supervision_without_boxes_is_refused_in_one_line(tmp_path):
    """A data folder with no entities file (here the sample set written as a Karpathy folder, which keeps no boxes)
    and no --entities: the run stops before training, naming the option."""
    folder = tmp_path / "sample"
    write_sample_dataset(folder, 12, 4, 4, image_size=32)
    model = {**tiny_arguments(tmp_path).model, "attention_supervision_weight": 1.0}
    with pytest.raises(SettingsError, match="--entities"):
        train(tiny_arguments(tmp_path / "run", data=str(folder), model=model))
    with pytest.raises(FileNotFoundError, match="no-such.json"):
        train(tiny_arguments(tmp_path / "run2", data=str(folder), model=model, entities=str(tmp_path / "no-such.json")))


@pytest.mark.slow
def test_supervision_on_the_sample_shapes_raises_pointing_accuracy(tmp_path):
    """Two runs of the same length from the same seed on the sample set, one with attention supervision: the
    supervised model's most-attended cell lands on the named shape measurably more often."""
    pointing = {}
    for weight in (0.0, 1.0):
        model_config = {**tiny_arguments(tmp_path).model, "grid_size": 3, "attention_supervision_weight": weight}
        args = tiny_arguments(
            tmp_path / f"run{weight}", sample_sizes=[480, 12, 60], num_epochs=6, model=model_config, eval_num_beams=1
        )
        train(args)
        model = AutoModel.from_pretrained(tmp_path / f"run{weight}" / "final")
        processor = AutoProcessor.from_pretrained(tmp_path / f"run{weight}" / "final")
        test = make_sample_dataset(*args.sample_sizes, seed=args.sample_seed, image_size=32)["test"]
        metrics = evaluate_split(model, processor, test, tmp_path / f"eval{weight}", "test", meteor=False, num_beams=1)
        pointing[weight] = metrics["attention"]["pointing_accuracy"]
    print(f"pointing on the sample test split: unsupervised {pointing[0.0]:.3f}, supervised {pointing[1.0]:.3f}")
    assert pointing[1.0] > pointing[0.0] + 0.1
