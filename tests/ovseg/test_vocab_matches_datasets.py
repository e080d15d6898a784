"""The shipped vocabularies and the evaluation datasets agree on class names and id order."""

import pytest

from emerdiff.data.registry import dataset_metadata
from ovseg import load_vocab


@pytest.mark.parametrize("vocab,split", [
    ("coco", "coco_stuff171_val"), ("coco_object", "coco_object_val"), ("ade150", "ade20k_val"), ("pc59", "pascal_context59_val"),
    ("pc459", "pascal_context459_val"), ("city19", "cityscapes19_val"), ("voc", "voc2012_val"),
])
def test_vocabulary_names_the_dataset_classes_in_id_order(vocab, split):
    assert load_vocab(vocab) == list(dataset_metadata(split).classes)
