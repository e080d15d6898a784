"""The toy world's scenes: a pure function of the seed, disjoint train/val seeds, labels and captions that agree."""

import json

import numpy as np
import pytest

from emerdiff.data import build_dataset, dataset_metadata
from emerdiff.data.toyworld import (CLASSES, IGNORE_INDEX, THINGS, VAL_SEED_START, caption, draw_scene, scene_id,
                                    train_seeds, val_seeds)


def test_a_scene_is_a_pure_function_of_its_seed():
    a, b = draw_scene(7), draw_scene(7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.label, b.label) and a.caption == b.caption
    assert not np.array_equal(a.image, draw_scene(8).image)


def test_training_seeds_never_reach_the_validation_seeds():
    assert max(train_seeds(VAL_SEED_START)) < min(val_seeds())
    with pytest.raises(ValueError, match="training scenes"):
        train_seeds(VAL_SEED_START + 1)
    assert scene_id(3) == "train_0000003" and scene_id(VAL_SEED_START) == "val_1000000"


def test_every_pixel_has_a_class_and_the_caption_names_the_classes_present():
    for seed in range(20):
        scene = draw_scene(seed)
        assert scene.image.shape == (128, 128, 3) and scene.label.shape == (128, 128)
        assert scene.label.max() < len(CLASSES) and not (scene.label == IGNORE_INDEX).any()
        present = {CLASSES[i] for i in np.unique(scene.label)}
        named = {word.strip(",") for word in scene.caption.split()}
        assert present <= named, (present, scene.caption)


def test_a_caption_lists_things_then_stuff_by_area_and_leaves_out_hidden_things():
    label = np.zeros((4, 4), np.uint8)  # sky
    label[2:] = CLASSES.index("grass")
    label[3, :3] = CLASSES.index("grass") + 1  # sand: 3 pixels, less than grass's 5
    label[0, 0] = CLASSES.index("ball")
    assert caption(label, ["a red ball", "a tree"]) == "a red ball on sky, grass, sand"  # the tree is hidden


def test_the_split_is_drawn_once_and_read_back_as_files(tmp_path):
    image_list = tmp_path / "ids.txt"
    image_list.write_text("val_1000000\nval_1000003\n")
    split = build_dataset("toyworld_val", tmp_path / "world", image_list=str(image_list))
    item = split[1]
    scene = draw_scene(VAL_SEED_START + 3)
    assert item["meta"]["id"] == "val_1000003"
    assert np.array_equal(item["image"], scene.image) and np.array_equal(item["label"], scene.label)
    captions = json.loads((tmp_path / "world" / "captions.json").read_text())
    assert captions["val_1000003"] == scene.caption and len(captions) == len(val_seeds())
    assert dataset_metadata("toyworld_val").classes == CLASSES and set(THINGS) <= set(CLASSES)
