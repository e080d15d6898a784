"""emerdiff.predict.render: label PNGs that read back as the labels, boundaries, legends."""

import numpy as np
import pytest
from PIL import Image

from emerdiff.predict.render import TITLE_HEIGHT, boundaries, label_image, legend_overlay, palette


@pytest.mark.parametrize("num_masks", [3, 255, 300])
def test_label_png_reads_back_as_the_labels_8_bit_palette_up_to_255_masks_else_16_bit(tmp_path, num_masks):
    labels = np.arange(20 * 16).reshape(20, 16) % num_masks
    label_image(labels, num_masks).save(tmp_path / "l.png")
    with Image.open(tmp_path / "l.png") as img:
        assert img.mode == ("P" if num_masks <= 255 else "I;16")
        np.testing.assert_array_equal(np.asarray(img), labels)


def test_boundaries_mark_exactly_where_labels_change():
    labels = np.zeros((4, 5), dtype=np.int64)
    labels[:, 3:] = 1
    edge = boundaries(labels)
    assert edge[:, 2].all() and edge.sum() == 4


def test_legend_has_one_swatch_row_per_class_present_and_unnamed_pixels_keep_the_photo():
    photo = np.full((30, 40, 3), 77, dtype=np.uint8)
    labels = np.full((30, 40), -1, dtype=np.int64)
    labels[:, 20:] = 2  # class 2 on the right; class 0 and 1 absent; the left half has no class
    picture = np.asarray(legend_overlay(photo, labels, ["cat", "dog", "sky"]))
    assert picture.shape == (30 + TITLE_HEIGHT, 40, 3)
    np.testing.assert_array_equal(picture[:30, :19], photo[:, :19])
    swatch = picture[30 + TITLE_HEIGHT // 2, 4 + (TITLE_HEIGHT - 8) // 2]
    np.testing.assert_array_equal(swatch, palette(3)[2])
