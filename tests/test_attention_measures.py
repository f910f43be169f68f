"""Attention measures against boxes: hand-made maps with known answers, and Flickr30k Entities annotations read and
scaled onto the pictures as loaded (small generated files; the shared Flickr8k folder is not needed)."""

import json

import numpy as np
import pytest
from datasets import Dataset, Features, Image, Value
from PIL import Image as PILImage

from hf_captioner import CaptionerImageProcessor
from hf_captioner.attention_measures import (
    AttentionMeasures,
    NamedRegion,
    entity_regions,
    head_noun,
    load_flickr30k_entities,
)
from hf_captioner.inference import WordAttention

# 100 x 100 pictures as they are (no resize, no crop): a 4 x 4 grid has cell centres at 12.5, 37.5, 62.5, 87.5
PROCESSOR = CaptionerImageProcessor(do_resize=False, do_center_crop=False)


def one_hot(cell: int, grid: int = 4) -> np.ndarray:
    attention = np.zeros(grid * grid)
    attention[cell] = 1.0
    return attention.reshape(grid, grid)


def measure(regions, words, size=(100, 100)) -> dict:
    measures = AttentionMeasures(lambda row: (regions, size), 4, PROCESSOR)
    measures(0, words)
    return measures.result()


def test_pointing_mass_and_chance_against_a_box():
    dog = NamedRegion({"dog"}, [(0, 0, 49, 49)])  # the top-left quarter: 4 of the 16 cell centres
    uniform = np.full((4, 4), 1 / 16)
    result = measure(
        [dog], [WordAttention("a", uniform), WordAttention("dog", one_hot(5)), WordAttention("runs", one_hot(15))]
    )
    assert result["pointing_nouns"] == 1 and result["pointing_accuracy"] == 1.0  # cell 5 = (37.5, 37.5)
    assert result["attention_in_boxes"] == pytest.approx(1.0) and result["pointing_chance"] == pytest.approx(0.25)
    # uniform: 1, one cell: 0 -> mean 1/3; the peak moved from word 2 to word 3 (word 1's argmax is cell 0)
    assert result["normalised_entropy"] == pytest.approx(1 / 3) and result["words"] == 3
    assert result["peak_moves"] == pytest.approx(1.0)
    missed = measure([dog], [WordAttention("dog", one_hot(15))])
    assert missed["pointing_accuracy"] == 0.0 and missed["attention_in_boxes"] == 0.0
    assert missed["peak_moves"] is None  # one word: nothing to move between


def test_a_qualifier_picks_between_two_things_of_a_kind():
    red = NamedRegion({"circle"}, [(0, 0, 49, 49)], {"red"})
    blue = NamedRegion({"circle"}, [(50, 50, 99, 99)], {"blue"})
    words = [WordAttention("blue", one_hot(0)), WordAttention("circle", one_hot(15))]
    assert measure([red, blue], words)["pointing_accuracy"] == 1.0
    unqualified = measure([red, blue], [WordAttention("circle", one_hot(15))])  # either circle counts
    assert unqualified["pointing_accuracy"] == 1.0 and unqualified["pointing_chance"] == pytest.approx(0.5)


def test_nothing_named_gives_no_rates_rather_than_made_up_ones():
    result = measure([NamedRegion({"dog"}, [(0, 0, 9, 9)])], [WordAttention("cat", one_hot(0))])
    assert result["pointing_nouns"] == 0 and result["pointing_accuracy"] is None
    assert result["normalised_entropy"] == 0.0


def test_head_noun_is_the_phrase_s_last_word():
    assert head_noun("A little girl") == "girl" and head_noun("the green grass .") == "grass"
    assert head_noun("---") is None


def test_flickr30k_entities_boxes_are_scaled_onto_the_loaded_pictures(tmp_path):
    annotations = {
        "42_abc.jpg": {
            "width": 400,
            "height": 200,  # the original picture; the loaded copy is squashed to 100 x 100
            "boxes": {"7": [[0, 0, 199, 99]], "8": [[200, 100, 399, 199]]},
            "phrases": [
                [0, "7", "animals", "A brown dog"],
                [1, "7", "animals", "a puppy"],
                [0, "8", "other", "a ball"],
                [0, "9", "scene", "the park"],
            ],
        }
    }
    path = tmp_path / "entities.json"
    path.write_text(json.dumps(annotations))
    entities = load_flickr30k_entities(path)
    assert set(entities) == {"42_abc"}  # keyed by image id, as the loaders name images
    dataset = Dataset.from_dict(
        {"image": [PILImage.new("RGB", (100, 100))], "image_id": ["42_abc"]},
        features=Features({"image": Image(), "image_id": Value("string")}),
    )
    regions, size = entity_regions(entities, dataset)(0)
    assert size == (100, 100)
    by_name = {frozenset(r.names): r.boxes for r in regions}
    assert set(by_name) == {frozenset({"dog", "puppy"}), frozenset({"ball"})}  # "park" has no box
    assert by_name[frozenset({"dog", "puppy"})] == [pytest.approx((0, 0, 49, 49))]
    assert by_name[frozenset({"ball"})] == [pytest.approx((50, 50, 99, 99))]


def test_bad_entities_files_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such Flickr30k Entities file"):
        load_flickr30k_entities(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a JSON file"):
        load_flickr30k_entities(tmp_path / "bad.json")
    (tmp_path / "odd.json").write_text(json.dumps({"a.jpg": {"boxes": {}}}))
    with pytest.raises(ValueError, match="width, height, boxes, phrases"):
        load_flickr30k_entities(tmp_path / "odd.json")


def test_attention_figures_draw_the_named_things_boxes_on_their_words_panels():
    from hf_captioner.visualize import panel_axes, plot_attention

    attention = np.full((4, 4), 1 / 16)
    figure = plot_attention(
        PILImage.new("RGB", (100, 100)),
        ["a", "dog"],
        [attention, attention],
        boxes=[None, [(0, 0, 49, 49), (60, 60, 69, 69)]],
    )
    assert [len(axes.patches) for axes in panel_axes(figure)] == [0, 2]
    with pytest.raises(ValueError, match="1 box lists"):
        plot_attention(PILImage.new("RGB", (100, 100)), ["a", "dog"], [attention, attention], boxes=[None])


def test_the_sentinel_share_is_measured_apart_on_named_words_and_the_others():
    dog = NamedRegion({"dog"}, [(0, 0, 49, 49)])
    words = [
        WordAttention("a", one_hot(0), 0.9),
        WordAttention("dog", one_hot(0), 0.2),
        WordAttention("runs", one_hot(5), 0.5),
    ]
    result = measure([dog], words)
    assert result["sentinel_share_named"] == pytest.approx(0.2)
    assert result["sentinel_share_other"] == pytest.approx(0.7)
    assert measure([dog], [WordAttention("dog", one_hot(0))])["sentinel_share_named"] is None
