"""Naming masks: class text embeddings (templates, synonyms, cache), mask labelling and the MaskCLIP baseline."""

import math

import pytest
import torch
import torch.nn.functional as F

from ovseg import (
    IMAGENET_TEMPLATES,
    MASKCLIP_TEMPLATES,
    TINY_MODEL,
    UNLABELLED,
    cached_text_embeddings,
    label_masks,
    load_clip,
    maskclip_labels,
    text_embeddings,
)

ONE_TEMPLATE = ("a photo of a {}.",)
TWO_TEMPLATES = ("a photo of a {}.", "a drawing of the {}.")


@pytest.fixture(scope="module")
def clip():
    torch.manual_seed(0)
    return load_clip(TINY_MODEL, pretrained=None)


def _basis(dim=8):
    """Orthonormal class embeddings e0..e{dim-1}."""
    return torch.eye(dim)


def _dense_from_cells(cell_vectors):
    """[D, h, w] dense map from an [h, w, D] array of cell vectors."""
    return cell_vectors.permute(2, 0, 1).contiguous()


# ---- text embeddings -------------------------------------------------------------------------


def test_template_sets_are_clip_imagenet_80_and_maskclip_85():
    assert len(IMAGENET_TEMPLATES) == 80 and len(set(IMAGENET_TEMPLATES)) == 80
    assert IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in MASKCLIP_TEMPLATES)
    assert MASKCLIP_TEMPLATES[:80] == IMAGENET_TEMPLATES and len(MASKCLIP_TEMPLATES) == 85


def test_class_embedding_is_the_normalised_average_over_templates_and_synonyms(clip):
    def prompt(text):
        return F.normalize(clip.model.encode_text(clip.tokenizer([text])), dim=-1)[0]

    with torch.no_grad():
        embeddings = text_embeddings(clip.model, clip.tokenizer, ["cat", ("dog", "puppy")], TWO_TEMPLATES)
        cat = F.normalize(prompt("a photo of a cat.") + prompt("a drawing of the cat."), dim=0)
        dog = prompt("a photo of a dog.") + prompt("a drawing of the dog.")
        dog = F.normalize(dog + prompt("a photo of a puppy.") + prompt("a drawing of the puppy."), dim=0)
    assert embeddings.shape == (2, 32)
    torch.testing.assert_close(embeddings[0], cat)
    torch.testing.assert_close(embeddings[1], dog)


def test_text_cache_is_reused_for_the_same_vocabulary(clip, tmp_path):
    args = dict(cache_dir=tmp_path, model_name=TINY_MODEL, pretrained=None)
    first = cached_text_embeddings(clip.model, clip.tokenizer, ["cat", "dog"], ONE_TEMPLATE, **args)
    (path,) = tmp_path.glob("*.pt")
    stored = torch.load(path, weights_only=True)
    torch.save({"key": stored["key"], "embeddings": stored["embeddings"] * 0 + 7}, path)  # mark the entry
    again = cached_text_embeddings(clip.model, clip.tokenizer, ["cat", "dog"], ONE_TEMPLATE, **args)
    assert torch.equal(again, torch.full_like(first, 7.0))


@pytest.mark.parametrize(
    ("classes", "templates"),
    [
        (["dog", "cat"], ONE_TEMPLATE),  # same names, other order
        (["cat", "dog", "sky"], ONE_TEMPLATE),  # one more class
        (["cat", ("dog", "puppy")], ONE_TEMPLATE),  # a new synonym
        (["cat", "dog"], TWO_TEMPLATES),  # other templates
    ],
)
def test_text_cache_is_not_used_for_a_changed_vocabulary_or_templates(clip, tmp_path, classes, templates):
    args = dict(cache_dir=tmp_path, model_name=TINY_MODEL, pretrained=None)
    cached_text_embeddings(clip.model, clip.tokenizer, ["cat", "dog"], ONE_TEMPLATE, **args)
    got = cached_text_embeddings(clip.model, clip.tokenizer, classes, templates, **args)
    with torch.no_grad():
        torch.testing.assert_close(got, text_embeddings(clip.model, clip.tokenizer, classes, templates))
    assert len(list(tmp_path.glob("*.pt"))) == 2


def test_text_cache_file_names_a_random_clip_by_its_seed_and_real_weights_by_their_tag_as_before(clip, tmp_path):
    for folder, weights in [("random", dict(pretrained=None, init_seed=3)), ("unknown_seed", dict(pretrained=None)),
                            ("tag", dict(pretrained="openai", init_seed=3))]:
        cached_text_embeddings(clip.model, clip.tokenizer, ["cat"], ONE_TEMPLATE, cache_dir=tmp_path / folder,
                               model_name=TINY_MODEL, **weights)
    names = {folder: [p.name.split("__")[:2] for p in (tmp_path / folder).glob("*.pt")]
             for folder in ("random", "unknown_seed", "tag")}
    assert names == {"random": [[TINY_MODEL, "random-seed3"]], "unknown_seed": [[TINY_MODEL, "random"]],
                     "tag": [[TINY_MODEL, "openai"]]}


def test_text_cache_is_not_shared_between_different_weights_with_the_same_names(clip, tmp_path):
    torch.manual_seed(1)
    other = load_clip(TINY_MODEL, pretrained=None)
    args = dict(cache_dir=tmp_path, model_name=TINY_MODEL, pretrained=None)
    first = cached_text_embeddings(clip.model, clip.tokenizer, ["cat", "dog"], ONE_TEMPLATE, **args)
    second = cached_text_embeddings(other.model, other.tokenizer, ["cat", "dog"], ONE_TEMPLATE, **args)
    assert not torch.allclose(first, second)


# ---- labelling masks -------------------------------------------------------------------------


def test_mask_whose_embedding_equals_a_class_text_takes_that_class():
    text = _basis()[:3]
    cells = torch.stack([text[2], text[0]]).repeat_interleave(2, 0)[None].expand(4, 4, 8)  # columns: 2 2 0 0
    segments = torch.zeros(16, 16, dtype=torch.long)
    segments[:, 8:] = 1  # 4 px per cell: left mask = class 2 cells, right = class 0 cells
    result = label_masks(_dense_from_cells(cells), segments, text)
    assert result.class_ids.tolist() == [2, 0]
    torch.testing.assert_close(result.scores, torch.ones(2))
    assert result.label_map.dtype == torch.int64
    assert torch.equal(result.label_map, torch.where(segments == 0, 2, 0))


def test_mask_embedding_is_the_area_weighted_mean_of_the_cells_it_covers():
    a, b = _basis()[:2]
    cells = torch.stack([a, b])[None].expand(1, 2, 8)  # grid 1x2 on a 4x8 image: 16 px per cell
    segments = torch.ones(4, 8, dtype=torch.long)
    segments[:, :4] = 0  # all of cell a
    segments[0, 4] = 0  # plus 1 of 16 px of cell b
    result = label_masks(_dense_from_cells(cells), segments, torch.stack([a, b]))
    torch.testing.assert_close(result.mask_embeddings[0], F.normalize(16 * a + 1 * b, dim=0))
    torch.testing.assert_close(result.mask_embeddings[1], b)


def test_label_map_and_equivalent_mask_stack_give_the_same_result_at_non_divisible_sizes():
    torch.manual_seed(0)
    dense = F.normalize(torch.randn(8, 3, 5), dim=0)
    segments = torch.randint(0, 4, (23, 37))
    stack = F.one_hot(segments, 4).permute(2, 0, 1).bool()
    from_map = label_masks(dense, segments, _basis())
    from_stack = label_masks(dense, stack, _basis())
    torch.testing.assert_close(from_map.mask_embeddings, from_stack.mask_embeddings)
    assert torch.equal(from_map.label_map, from_stack.label_map)


def test_mask_embedding_equals_averaging_pixel_centre_upsampled_embeddings_over_the_mask():
    torch.manual_seed(0)
    dense, segments = torch.randn(8, 3, 5), torch.randint(0, 4, (23, 37))
    upsampled = F.interpolate(dense[None], size=(23, 37), mode="nearest-exact")[0]
    expected = torch.stack([F.normalize(upsampled[:, segments == k].mean(dim=1), dim=0) for k in range(4)])
    torch.testing.assert_close(label_masks(dense, segments, _basis()).mask_embeddings, expected)


def test_each_pixel_is_pooled_from_the_cell_containing_its_centre():
    e = _basis()
    dense = _dense_from_cells(e[:3, None, :])  # 3 cell rows: e0, e1, e2
    segments = torch.arange(7)[:, None]  # 7 one-pixel rows; cell edges at 2.33 and 4.67 px
    result = label_masks(dense, segments, e[:3])
    assert result.class_ids.tolist() == [0, 0, 1, 1, 1, 2, 2]


def test_ties_between_classes_go_to_the_lowest_class_id():
    e = _basis()
    text = torch.stack([e[1], e[0], e[0]])  # classes 1 and 2 are identical
    result = label_masks(_dense_from_cells(e[0].expand(2, 2, 8)), torch.zeros(8, 8, dtype=torch.long), text)
    assert result.class_ids.tolist() == [1]


def test_empty_masks_are_unlabelled_with_nan_score_and_zero_embedding():
    e = _basis()
    segments = torch.zeros(8, 8, dtype=torch.long)
    segments[4:] = 2  # segment 1 and 3 have no pixels
    result = label_masks(_dense_from_cells(e[3].expand(2, 2, 8)), segments, e[:4], num_masks=4)
    assert result.class_ids.tolist() == [3, UNLABELLED, 3, UNLABELLED]
    assert math.isnan(result.scores[1]) and math.isnan(result.scores[3])
    assert torch.equal(result.mask_embeddings[1], torch.zeros(8))
    assert torch.equal(result.label_map, torch.full((8, 8), 3))


def test_masks_below_the_threshold_become_background():
    e = _basis()
    text = torch.stack([e[7], e[0], e[1]])  # class 0 = background
    weak = F.normalize(e[0] + 2 * e[5], dim=0)  # cosine to class 1 is 1/sqrt(5) ~ 0.45
    cells = torch.stack([weak, e[1]])[None].expand(1, 2, 8)  # right cell is exactly class 2 (e1)
    segments = torch.tensor([[0] * 4 + [1] * 4] * 4)
    kept = label_masks(_dense_from_cells(cells), segments, text)
    assert kept.class_ids.tolist() == [1, 2]
    thresholded = label_masks(_dense_from_cells(cells), segments, text, background_id=0, threshold=0.5)
    assert thresholded.class_ids.tolist() == [0, 2]
    assert torch.equal(thresholded.label_map[:, :4], torch.zeros(4, 4, dtype=torch.long))


def test_threshold_without_a_background_class_is_rejected():
    with pytest.raises(ValueError, match="background_id"):
        label_masks(torch.randn(8, 2, 2), torch.zeros(4, 4, dtype=torch.long), _basis(), threshold=0.2)


def test_mask_stack_pixels_take_their_strongest_mask_and_uncovered_pixels_are_unlabelled():
    e = _basis()
    dense = _dense_from_cells(torch.stack([e[0], e[1]])[None].expand(1, 2, 8))
    stack = torch.zeros(2, 4, 8)
    stack[0, :, :4] = 1.0
    stack[1, :, 4:6] = 1.0
    stack[0, 0, 4] = 0.5  # weaker than mask 1 there
    result = label_masks(dense, stack, e[:2])
    assert result.label_map[0, 4] == 1
    assert torch.equal(result.label_map[:, 6:], torch.full((4, 2), UNLABELLED))


# ---- plain MaskCLIP baseline -----------------------------------------------------------------


def test_baseline_interpolates_similarities_not_labels():
    e = _basis()
    text = e[:3]
    cells = torch.stack([e[0], e[0], e[2], e[2]])[None].expand(2, 4, 8)  # class 0 | class 2
    labels = maskclip_labels(_dense_from_cells(cells), text, (8, 32))
    assert labels.shape == (8, 32) and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == {0, 2}  # interpolating ids 0 and 2 would produce 1
    assert (labels[:, :16] == 0).all() and (labels[:, 16:] == 2).all()


def test_baseline_is_the_argmax_of_bilinearly_upsampled_cosines_whatever_the_chunking():
    torch.manual_seed(0)
    dense, text = torch.randn(8, 5, 7), torch.randn(11, 8)
    one_pass = maskclip_labels(dense, text, (37, 51), classes_per_pass=64)
    chunked = maskclip_labels(dense, text, (37, 51), classes_per_pass=3)
    cosine = torch.einsum("dhw,cd->chw", F.normalize(dense, dim=0), F.normalize(text, dim=1))
    by_hand = F.interpolate(cosine[None], size=(37, 51), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(one_pass, by_hand)
    assert torch.equal(one_pass, chunked)
    assert one_pass.min() >= 0 and one_pass.max() < 11


def test_baseline_ties_go_to_the_lowest_class_id_and_threshold_gives_background():
    e = _basis()
    text = torch.stack([e[7], e[0], e[0]])
    dense = _dense_from_cells(F.normalize(e[0] + e[1], dim=0).expand(2, 2, 8))  # cosine 0.71 to classes 1, 2
    assert (maskclip_labels(dense, text, (8, 8), classes_per_pass=2) == 1).all()
    assert (maskclip_labels(dense, text, (8, 8), background_id=0, threshold=0.8) == 0).all()
