"""emerdiff.predict.inputs: finding a user's images, naming them, reading them, sharding them over ranks."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from pytorch_lightning.overrides.distributed import UnrepeatedDistributedSamplerWrapper

from emerdiff.predict import InputError, PredictImages, SourceImages, find_images


def _touch_images(root: Path, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (10, 20, 30)).save(path)


def _rank_share(images, rank: int, world: int):
    """The names `rank` segments: our DataLoader as Trainer(use_distributed_sampler=True) shards it for predict."""
    data = PredictImages(images, num_workers=0)
    data.trainer = SimpleNamespace(global_rank=rank, world_size=world)
    loader = data.predict_dataloader()
    sampler = UnrepeatedDistributedSamplerWrapper(loader.sampler, num_replicas=world, rank=rank, shuffle=False)
    return [loader.dataset.images[i].name for i in sampler]


@pytest.mark.parametrize("length", [0, 1, 2, 5, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_lightning_sharding_gives_every_image_to_exactly_one_rank_even_with_fewer_images_than_ranks(
        tmp_path, length, world):
    names = [f"img{i}.png" for i in range(length)]
    _touch_images(tmp_path, names)
    images = find_images(str(tmp_path)) if length else []
    shares = [_rank_share(images, rank, world) for rank in range(world)]
    assert sorted(name for share in shares for name in share) == [f"img{i}" for i in range(length)]
    assert all(len(share) in (length // world, length // world + 1) for share in shares)


def test_folder_input_is_recursive_names_keep_folders_and_skip_the_output_folder(tmp_path: Path):
    _touch_images(tmp_path, ["b.png", "trip/a.JPG", "trip/deep/c.webp", "out/old.png", "dup.jpg", "dup.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    images = find_images(str(tmp_path), exclude=tmp_path / "out")
    assert [i.name for i in images] == ["b", "dup.jpg", "dup.png", "trip/a", "trip/deep/c"]
    assert images[3].path == tmp_path / "trip" / "a.JPG"


def test_glob_list_file_and_single_file_inputs_are_named_relative_to_their_root(tmp_path: Path):
    _touch_images(tmp_path, ["x/one.png", "x/sub/two.png", "y/three.png"])
    assert [i.name for i in find_images(str(tmp_path / "x" / "**" / "*.png"))] == ["one", "sub/two"]
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\nx/sub/two.png\n\n{tmp_path / 'y' / 'three.png'}\nx/missing.png\n")
    listed = find_images(str(listing))
    assert [i.name for i in listed] == ["x/missing", "x/sub/two", "y/three"]  # missing files fail later, listed
    assert [i.name for i in find_images(str(tmp_path / "y" / "three.png"))] == ["three"]


def test_a_relative_input_gives_absolute_paths_so_the_manifest_works_from_any_folder(tmp_path: Path, monkeypatch):
    _touch_images(tmp_path, ["x/one.png"])
    monkeypatch.chdir(tmp_path)
    assert [i.path for i in find_images("x")] == [tmp_path / "x" / "one.png"]


def test_missing_input_and_a_folder_without_images_are_errors_saying_what_was_searched(tmp_path: Path):
    with pytest.raises(InputError, match="does not exist"):
        find_images(str(tmp_path / "nope"))
    (tmp_path / "a.txt.bak").write_text("x")
    with pytest.raises(InputError, match="no images found.*\\.png"):
        find_images(str(tmp_path))


def test_unreadable_files_become_samples_with_their_error(tmp_path: Path):
    _touch_images(tmp_path, ["good.png"])
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "empty.png").write_bytes(b"")
    samples = {sample.name: sample for sample in SourceImages(find_images(str(tmp_path)))}
    assert samples["good"].error is None and samples["good"].image.shape == (3, 6, 8)
    assert samples["good"].image.dtype == torch.uint8
    assert "0 bytes" in samples["empty"].error and samples["empty"].image is None
    assert "not a readable image" in samples["text"].error
