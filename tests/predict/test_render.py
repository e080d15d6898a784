"""emerdiff.predict.render: label PNGs that read back as the labels, boundaries, legends, class fills, grids."""

import numpy as np
import pytest
from PIL import Image

from emerdiff.predict.render import (
    TITLE_HEIGHT,
    NamedLabels,
    boundaries,
    class_fill,
    label_image,
    legend_overlay,
    palette,
    titled_grid,
    with_legend,
)


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


def test_class_fill_gives_each_class_its_colour_and_negative_ids_black():
    colours = np.array([[10, 20, 30], [40, 50, 60]], dtype=np.uint8)
    filled = class_fill(np.array([[0, 1], [-1, 1]]), colours)
    np.testing.assert_array_equal(filled, [[[10, 20, 30], [40, 50, 60]], [[0, 0, 0], [40, 50, 60]]])


def test_titled_grid_puts_each_panel_in_the_top_left_of_its_cell_below_one_title_row():
    a, b = np.full((6, 8, 3), 10, np.uint8), np.full((4, 5, 3), 200, np.uint8)  # cells: the largest panel, 6 x 8
    grid = np.asarray(titled_grid([[a, b], [b, a]], ["a", "b"]))
    assert grid.shape == (TITLE_HEIGHT + 2 * 6, 2 * 8, 3)
    top = TITLE_HEIGHT
    np.testing.assert_array_equal(grid[top : top + 6, :8], a)
    np.testing.assert_array_equal(grid[top : top + 4, 8:13], b)
    assert (grid[top + 4 : top + 6, 8:] == 255).all() and (grid[top : top + 6, 13:] == 255).all()  # white around b
    np.testing.assert_array_equal(grid[top + 6 : top + 10, :5], b)
    np.testing.assert_array_equal(grid[top + 6 :, 8:], a)
    with pytest.raises(ValueError):  # a row with more panels than titles
        titled_grid([[a, a, a]], ["a", "b"])


def test_legend_across_puts_classes_side_by_side_and_wraps_at_the_picture_width():
    labels = NamedLabels(np.arange(4), ["sky", "wall", "grass", "sand"])
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9]], dtype=np.uint8)
    wide = np.asarray(with_legend(Image.new("RGB", (600, 10), "white"), labels, colours, across=True))
    narrow = np.asarray(with_legend(Image.new("RGB", (160, 10), "white"), labels, colours, across=True))
    down = np.asarray(with_legend(Image.new("RGB", (600, 10), "white"), labels, colours))
    assert wide.shape[0] == 10 + TITLE_HEIGHT and down.shape[0] == 10 + 4 * TITLE_HEIGHT
    assert 10 + 2 * TITLE_HEIGHT <= narrow.shape[0] < down.shape[0]
    line = wide[10 + TITLE_HEIGHT // 2]
    for colour in colours:  # every swatch on the one line, in the given colours
        assert (line == colour).all(axis=-1).any()
