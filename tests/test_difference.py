"""Steps 9-11 after decoding: pair distances, smoothing, argmax at the input size, the bilinear baseline."""

import torch

from emerdiff.difference import argmax_at_size, bilinear_labels, difference_maps, resize_maps, smooth


def test_each_pair_of_variants_gives_the_rgb_distance_per_pixel():
    images = torch.zeros(4, 3, 2, 2)
    images[1, :, 0, 0] = torch.tensor([3.0, 4.0, 0.0])  # mask 0: -lambda vs +lambda differ by (3, 4, 0) at (0, 0)
    images[2, 0, 1, 1] = -2.0  # mask 1: only its -lambda image moved, at (1, 1)
    maps = difference_maps(images)
    assert maps.shape == (2, 2, 2)
    torch.testing.assert_close(maps[0], torch.tensor([[5.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(maps[1], torch.tensor([[0.0, 0.0], [0.0, 2.0]]))


def test_smoothing_keeps_the_total_of_an_interior_peak_and_sigma_zero_is_a_no_op():
    maps = torch.zeros(1, 21, 21)
    maps[0, 10, 10] = 1.0
    smoothed = smooth(maps, 1.0)
    torch.testing.assert_close(smoothed.sum(), torch.tensor(1.0), rtol=1e-5, atol=1e-6)
    assert smoothed[0, 10, 10] < 1.0 and smoothed[0, 10, 11] > 0
    assert smooth(maps, 0.0) is maps


def test_argmax_takes_the_largest_map_and_ties_go_to_the_lower_index():
    maps = torch.tensor([[[1.0, 2.0]], [[1.0, 3.0]]])  # [2 maps, 1, 2]
    labels, kept = argmax_at_size(maps, (1, 2), keep=True)
    assert labels.tolist() == [[0, 1]] and torch.equal(kept, maps)


def test_maps_are_resized_before_the_argmax_never_the_labels():
    maps = torch.tensor([[[0.0, 1.0]], [[0.6, 0.6]]])  # at 1 x 2; bilinear resize to 1 x 4 interpolates map 0
    labels, _ = argmax_at_size(maps, (1, 4))
    assert labels.tolist() == [[1, 1, 0, 0]]  # map 0 resized: 0, 0.25, 0.75, 1 against a flat 0.6
    assert resize_maps(maps, (1, 2)) is maps and resize_maps(maps, (2, 4)).shape == (2, 2, 4)


def test_bilinear_baseline_of_a_half_split_grid_splits_the_image_in_half():
    lowres = torch.tensor([[0, 1], [0, 1]])
    labels = bilinear_labels(lowres, 2, (4, 6))
    assert labels[:, :3].eq(0).all() and labels[:, 3:].eq(1).all()
