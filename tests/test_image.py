"""step 1 and bad inputs: every supported form is read, every unreadable one is a clear error."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_segmentor
from emerdiff import ImageLoadError
from emerdiff.image import image_seed, load_image, to_model_input


def test_path_pil_array_and_tensor_inputs_load_the_same_pixels(photo, tmp_path: Path):
    path = tmp_path / "photo.png"
    Image.fromarray(photo).save(path)
    expected = torch.from_numpy(photo).permute(2, 0, 1).float() / 255
    for form in (path, str(path), Image.fromarray(photo), photo, expected.clone()):
        torch.testing.assert_close(load_image(form), expected)


def test_grayscale_rgba_and_16_bit_images_become_rgb(photo, tmp_path: Path):
    gray = photo.mean(2).astype(np.uint8)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(photo).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(tmp_path / "deep.png")  # 16-bit, same brightness
    loaded_gray = load_image(tmp_path / "gray.png")
    assert loaded_gray.shape == (3, *gray.shape) and torch.equal(loaded_gray[0], loaded_gray[2])
    torch.testing.assert_close(load_image(tmp_path / "rgba.png"), load_image(photo))
    torch.testing.assert_close(load_image(tmp_path / "deep.png"), loaded_gray, atol=1 / 255, rtol=0)


def test_unreadable_empty_and_missing_files_are_named_in_the_error(tmp_path: Path):
    (tmp_path / "notes.jpg").write_text("this is not a JPEG")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageLoadError, match="notes.jpg.*not a readable image"):
        load_image(tmp_path / "notes.jpg")
    with pytest.raises(ImageLoadError, match="empty.png.*empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((4, 4, 2), dtype=np.uint8))


def test_model_input_is_square_and_in_minus_one_to_one(photo):
    x = to_model_input(load_image(photo), 64)
    assert x.shape == (1, 3, 64, 64) and x.min() >= -1 and x.max() <= 1


def test_seed_depends_on_content_and_base_seed_only(photo):
    rgb = load_image(photo)
    assert image_seed(rgb, 0) == image_seed(rgb.clone(), 0)
    assert image_seed(rgb, 0) != image_seed(rgb, 1)
    assert image_seed(rgb, 0) != image_seed(rgb.flip(2), 0)


def test_a_one_pixel_image_is_segmented_to_a_one_pixel_label_map(tiny_components):
    out = tiny_segmentor(tiny_components, resolution=128, num_masks=3).segment(np.full((1, 1, 3), 200, np.uint8))
    assert out.labels.shape == (1, 1) and 0 <= out.labels.item() < out.num_masks


def test_working_size_keeps_the_aspect_with_the_shorter_side_at_the_resolution():
    from emerdiff.image import largest_working_size, working_size

    assert working_size(400, 600, 512) == (512, 768) and working_size(600, 400, 512) == (768, 512)
    assert working_size(333, 517, 512) == (512, 768)  # 794.9 rounds to the nearest multiple of 64
    assert working_size(400, 600, 512, aspect="square") == (512, 512)
    assert working_size(100, 1000, 512) == (512, 1024)  # capped at twice the square's pixels
    assert working_size(100, 1000, 512, max_pixels=512 * 640) == (512, 640)
    assert largest_working_size(512) == (512, 1024) and largest_working_size(512, "square") == (512, 512)



def test_the_max_pixels_cap_is_stated_exactly_when_it_changes_an_image_s_aspect_ratio():
    from emerdiff.image import capped_aspect_note

    assert capped_aspect_note(512, 1536, 512) == (  # 3:1 would be 512 x 1536; twice the square's pixels allow 1024
        "a 1536x512 image (3:1) is processed at 1024x512 (2:1): segmentor.max_pixels (null = 2 x 512^2) caps the "
        "working size (the masks still cover the whole image at its own size); raise segmentor.max_pixels to keep "
        "its aspect ratio, at the cost of memory and time")
    assert "processed at 512x640 (1.25:1): segmentor.max_pixels (327680)" in capped_aspect_note(
        1000, 100, 512, max_pixels=512 * 640)  # a tall image, an explicit cap
    assert capped_aspect_note(512, 1024, 512) is None  # 2:1 fits the cap
    assert capped_aspect_note(400, 600, 512) is None  # 768 x 512 (rounded to 64 px, not capped)
    assert capped_aspect_note(512, 1536, 512, max_pixels=512 * 1536) is None  # a raised cap keeps 3:1
    assert capped_aspect_note(512, 1536, 512, aspect="square") is None  # squares are asked for, not capped
