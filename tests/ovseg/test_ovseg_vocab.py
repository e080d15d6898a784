"""Vocabularies: shipped class lists in dataset id order, user lists and files, clear errors."""

from pathlib import Path

import pytest

from ovseg import SHIPPED_VOCABS, load_vocab, read_vocabulary

EXPECTED_SIZES = {"coco": 171, "coco_object": 81, "ade150": 150, "pc59": 59, "pc459": 459, "city19": 19, "voc": 21, "toyworld": 10}

# (vocabulary, dataset id, name): anchors that catch shifted or reordered lists.
KNOWN_IDS = [
    ("coco", 0, "person"),
    ("coco", 79, "toothbrush"),
    ("coco", 80, "banner"),
    ("coco", 170, "wood"),
    ("coco_object", 0, "background"),
    ("coco_object", 1, "person"),
    ("coco_object", 80, "toothbrush"),
    ("ade150", 0, "wall"),
    ("ade150", 7, "bed"),
    ("ade150", 12, "person"),
    ("ade150", 149, "flag"),
    ("pc59", 0, "aeroplane"),
    ("pc59", 36, "person"),
    ("pc59", 58, "wood"),
    ("pc459", 0, "accordion"),
    ("pc459", 458, "wool"),
    ("city19", 0, "road"),
    ("city19", 11, "person"),
    ("city19", 18, "bicycle"),
    ("voc", 0, "background"),
    ("voc", 15, "person"),
    ("voc", 20, "tvmonitor"),
    ("toyworld", 0, "sky"),
    ("toyworld", 9, "pole"),
]


@pytest.mark.parametrize("name", SHIPPED_VOCABS)
def test_shipped_vocabulary_has_the_dataset_class_count_and_no_duplicates(name):
    names = load_vocab(name)
    assert len(names) == EXPECTED_SIZES[name]
    assert len(set(names)) == len(names)
    assert all(n == n.strip() and n for n in names)


@pytest.mark.parametrize(("name", "index", "class_name"), KNOWN_IDS)
def test_shipped_vocabulary_lists_classes_in_dataset_id_order(name, index, class_name):
    assert load_vocab(name)[index] == class_name


def test_pascal_context_59_is_a_subset_of_the_459_label_set():
    assert set(load_vocab("pc59")) <= set(load_vocab("pc459"))


@pytest.mark.parametrize(("name", "background"), [("voc", 0), ("coco_object", 0), ("ade150", None), ("coco", None)])
def test_background_index_is_the_class_named_background(name, background):
    assert read_vocabulary(name).background == background


def test_comma_separated_string_gives_classes_in_order_with_synonyms():
    vocab = read_vocabulary("cat, dog;puppy ,grass")
    assert load_vocab("cat, dog;puppy ,grass") == ["cat", "dog", "grass"]
    assert vocab.synonyms == (("cat",), ("dog", "puppy"), ("grass",))
    assert vocab.background is None


def test_single_class_string_needs_a_trailing_comma():
    assert load_vocab("cat,") == ["cat"]


def test_list_of_names_is_a_vocabulary_and_may_name_a_background():
    vocab = read_vocabulary(["sky", "background;void", "tv;television;monitor"])
    assert vocab.names == ("sky", "background", "tv")
    assert vocab.synonyms[2] == ("tv", "television", "monitor")
    assert vocab.background == 1


def test_text_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# my classes\nroad;street\n\nsky\n  tree  \n")
    assert load_vocab(str(path)) == ["road", "sky", "tree"]
    assert read_vocabulary(path).synonyms[0] == ("road", "street")


def test_unknown_vocabulary_name_raises_value_error_listing_shipped_ones():
    with pytest.raises(ValueError, match="ade150") as error:
        load_vocab("ade20k")
    assert all(name in str(error.value) for name in SHIPPED_VOCABS)


def test_missing_vocabulary_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="shipped vocabularies"):
        load_vocab(str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError):
        load_vocab(Path(tmp_path / "missing_too"))


def test_duplicate_or_empty_vocabularies_are_rejected():
    with pytest.raises(ValueError, match="duplicate"):
        load_vocab("cat,dog,cat")
    with pytest.raises(ValueError, match="empty"):
        load_vocab([" ", "# only a comment"])
