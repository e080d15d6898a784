"""The toy world: labelled synthetic scenes drawn from a seed, for training and measuring miniature models.

A scene is a sky or a wall above a wavy horizon, one or two ground bands (grass, sand, water) below it, and
one to four things (ball, box, tree, house, pole) standing on the ground, later ones in front. Every region
has a texture (noise, gradients, stripes, bricks, waves); things come in several colours and sizes and have
thin or small parts (poles one to three pixels wide, tree trunks, roof tips, windows) that a coarse grid
cannot follow. Each scene has a per-pixel class map and a caption naming what is in it.

Scenes are a pure function of their seed. Training uses seeds ``0 .. n-1`` (``n`` < `VAL_SEED_START`), the
validation split the seeds from `VAL_SEED_START` on, so no validation scene is ever trained on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from emerdiff.data.datasets import Interpolation, ListedSplit, Sample
from emerdiff.data.labels import DatasetMetadata

SIZE = 128
STUFF = ("sky", "wall", "grass", "sand", "water")
THINGS = ("ball", "box", "tree", "house", "pole")
CLASSES = STUFF + THINGS
CLASS_ID = {name: i for i, name in enumerate(CLASSES)}
IGNORE_INDEX = 255
PALETTE = (
    (120, 170, 230),
    (150, 80, 60),
    (60, 150, 50),
    (220, 200, 130),
    (40, 90, 170),
    (230, 40, 40),
    (160, 110, 50),
    (20, 90, 30),
    (240, 160, 200),
    (90, 90, 90),
)
VAL_SEED_START = 1_000_000
VAL_SIZE = 256
GENERATOR_VERSION = 1

THING_COLOURS = {  # name -> RGB; things share colours, so a thing's class is its shape, not its colour
    "red": (200, 40, 35),
    "yellow": (235, 205, 40),
    "white": (235, 235, 230),
    "orange": (235, 130, 30),
    "purple": (130, 60, 160),
    "blue": (40, 70, 200),
    "brown": (120, 75, 40),
    "grey": (130, 130, 135),
    "black": (30, 30, 35),
    "pink": (230, 140, 170),
}
THING_PALETTES = {
    "ball": ("red", "yellow", "white", "orange", "purple", "blue", "pink"),
    "box": ("brown", "grey", "blue", "red", "yellow", "orange"),
    "house": ("white", "yellow", "pink", "grey", "orange", "blue"),
    "pole": ("grey", "black", "white", "red"),
    "tree": ("green",),
}


@dataclass(frozen=True)
class Scene:
    """One drawn scene: RGB image, per-pixel class ids and a caption naming its classes (largest first)."""

    image: np.ndarray  # [H, W, 3] uint8
    label: np.ndarray  # [H, W] uint8 class ids
    caption: str
    seed: int


class Canvas:
    """The image and class map being painted, with the pixel grid and the seed's random generator."""

    def __init__(self, rng: np.random.Generator, size: int) -> None:
        self.rng = rng
        self.size = size
        self.image = np.zeros((size, size, 3), np.float32)
        self.label = np.full((size, size), IGNORE_INDEX, np.uint8)
        self.y, self.x = np.mgrid[0:size, 0:size].astype(np.float32)
        self.thing_words: list[str] = []

    def paint(self, mask: np.ndarray, colour: np.ndarray, class_name: str) -> None:
        """Paint `colour` ([3] or [H, W, 3], 0..255) inside `mask` and give its pixels the class."""
        colour = np.broadcast_to(np.asarray(colour, np.float32), self.image.shape)
        self.image[mask] = colour[mask]
        self.label[mask] = CLASS_ID[class_name]

    def noise(self, cells: int, amplitude: float) -> np.ndarray:
        """Smooth value noise, [H, W] in about [-amplitude, amplitude], from a cells x cells random grid."""
        grid = self.rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
        smooth = Image.fromarray(grid, mode="F").resize((self.size, self.size), Image.Resampling.BICUBIC)
        return amplitude * np.asarray(smooth)

    def jitter(self, rgb: Sequence[float], amount: float = 18.0) -> np.ndarray:
        """`rgb` shifted by a random brightness and tint, so no two scenes share exact colours."""
        return np.asarray(rgb, np.float32) + self.rng.uniform(-amount, amount) + self.rng.uniform(-6, 6, 3)

    def shade(self, rgb: np.ndarray, field: np.ndarray) -> np.ndarray:
        """A [H, W, 3] texture: the colour brightened or darkened by `field` ([H, W])."""
        return rgb[None, None, :] + field[..., None]

    def wavy_line(self, height: float, amplitude: float) -> np.ndarray:
        """A horizon-like curve, [W]: `height` plus two random sines."""
        x = np.arange(self.size, dtype=np.float32)
        waves = [
            amplitude
            * self.rng.uniform(0.3, 1.0)
            * np.sin(x * self.rng.uniform(0.02, 0.12) + self.rng.uniform(0, 2 * np.pi))
            for _ in range(2)
        ]
        return height + waves[0] + waves[1]


def _sky(c: Canvas) -> np.ndarray:
    top, bottom = c.jitter((90, 140, 220)), c.jitter((185, 215, 245))
    t = (c.y / c.size)[..., None]
    clouds = np.clip(c.noise(6, 1.6) - 0.6, 0, 1)[..., None] * c.rng.uniform(0, 1.0)
    sky = top * (1 - t) + bottom * t
    return sky * (1 - clouds) + 245 * clouds


def _wall(c: Canvas) -> np.ndarray:
    base = c.jitter(((170, 85, 60), (150, 150, 145), (190, 170, 140))[c.rng.integers(3)])
    brick_h = int(c.rng.integers(5, 9))
    brick_w = 2 * brick_h + int(c.rng.integers(0, 5))
    row = (c.y // brick_h).astype(np.int64)
    mortar = ((c.y % brick_h) < 1) | (((c.x + (row % 2) * brick_w / 2) % brick_w) < 1)
    texture = c.shade(base, c.noise(16, 10))
    texture[mortar] = texture[mortar] * 0.55 + 100
    return texture


def _grass(c: Canvas) -> np.ndarray:
    base = c.jitter((70, 150, 55))
    blades = c.rng.uniform(-18, 18, (c.size // 3 + 1, c.size)).astype(np.float32).repeat(3, axis=0)[: c.size]
    return c.shade(base, c.noise(8, 14) + blades)


def _sand(c: Canvas) -> np.ndarray:
    base = c.jitter((215, 195, 135))
    ripples = 8 * np.sin((c.x * 0.3 + c.y) * c.rng.uniform(0.4, 0.8))
    return c.shade(base, c.noise(12, 8) + ripples + c.rng.normal(0, 5, c.y.shape).astype(np.float32))


def _water(c: Canvas) -> np.ndarray:
    base = c.jitter((45, 100, 175))
    waves = 16 * np.sin(c.y * c.rng.uniform(0.6, 1.2) + c.noise(5, 2.5))
    return c.shade(base, waves + c.noise(10, 6))


STUFF_TEXTURES: dict[str, Callable[[Canvas], np.ndarray]] = {
    "sky": _sky,
    "wall": _wall,
    "grass": _grass,
    "sand": _sand,
    "water": _water,
}


def _thing_colour(c: Canvas, thing: str) -> tuple[str, np.ndarray]:
    """A colour word with its article ("an orange") and its jittered RGB."""
    name = THING_PALETTES[thing][c.rng.integers(len(THING_PALETTES[thing]))]
    rgb = (40, 120, 40) if name == "green" else THING_COLOURS[name]
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}", c.jitter(rgb, 12)


def _ball(c: Canvas, x: float, base: float, scale: float) -> None:
    r = scale * c.rng.uniform(0.12, 0.3)
    word, rgb = _thing_colour(c, "ball")
    cy = base - r
    d2 = (c.x - x) ** 2 + (c.y - cy) ** 2
    highlight = 40 * np.exp(-((c.x - x + r / 3) ** 2 + (c.y - cy + r / 3) ** 2) / (r * r / 4 + 1))
    c.paint(d2 <= r * r, c.shade(rgb, highlight - 25 * d2 / (r * r)), "ball")
    c.thing_words.append(f"{word} ball")


def _box(c: Canvas, x: float, base: float, scale: float) -> None:
    w, h = scale * c.rng.uniform(0.2, 0.5), scale * c.rng.uniform(0.15, 0.45)
    word, rgb = _thing_colour(c, "box")
    inside = (np.abs(c.x - x) <= w / 2) & (c.y <= base) & (c.y >= base - h)
    edge = (np.abs(np.abs(c.x - x) - w / 2) < 1.2) | (np.abs(c.y - (base - h)) < 1.2)
    c.paint(inside, c.shade(rgb, c.noise(10, 8) - 45 * edge), "box")
    c.thing_words.append(f"{word} box")


def _tree(c: Canvas, x: float, base: float, scale: float) -> None:
    trunk_w, trunk_h = c.rng.uniform(1.5, 4.0), scale * c.rng.uniform(0.15, 0.35)
    crown = scale * c.rng.uniform(0.12, 0.28)
    trunk = (np.abs(c.x - x) <= trunk_w / 2) & (c.y <= base) & (c.y >= base - trunk_h - crown / 2)
    c.paint(trunk, c.jitter((95, 60, 30), 10), "tree")
    green = c.shade(c.jitter((35, 110, 35), 15), c.noise(20, 16))
    top = base - trunk_h
    if c.rng.random() < 0.5:  # round crown
        c.paint((c.x - x) ** 2 + (c.y - top + crown) ** 2 <= crown * crown, green, "tree")
    else:  # pointed crown: a triangle with a thin tip
        height = 2.6 * crown
        inside = (c.y <= top) & (c.y >= top - height) & (np.abs(c.x - x) <= (c.y - top + height) / height * crown)
        c.paint(inside, green, "tree")
    c.thing_words.append("a tree")


def _house(c: Canvas, x: float, base: float, scale: float) -> None:
    w, h = scale * c.rng.uniform(0.3, 0.6), scale * c.rng.uniform(0.2, 0.4)
    word, rgb = _thing_colour(c, "house")
    body = (np.abs(c.x - x) <= w / 2) & (c.y <= base) & (c.y >= base - h)
    c.paint(body, c.shade(rgb, c.noise(12, 6)), "house")
    roof_h, eave = h * c.rng.uniform(0.5, 1.0), w * c.rng.uniform(0.55, 0.7)
    roof_base = base - h
    roof = (
        (c.y < roof_base)
        & (c.y >= roof_base - roof_h)
        & (np.abs(c.x - x) <= (c.y - roof_base + roof_h) / roof_h * eave)
    )
    c.paint(roof, c.jitter(((150, 40, 30), (80, 50, 40), (60, 60, 70))[c.rng.integers(3)], 10), "house")
    side = max(2.0, w / 6)
    for dx in (-w / 4, w / 4):  # two small windows: house pixels of another colour
        window = (np.abs(c.x - x - dx) <= side / 2) & (np.abs(c.y - (base - 0.6 * h)) <= side / 2)
        c.paint(window, c.jitter((60, 80, 120), 10), "house")
    c.thing_words.append(f"{word} house")


def _pole(c: Canvas, x: float, base: float, scale: float) -> None:
    width, height = c.rng.uniform(1.0, 3.0), scale * c.rng.uniform(0.5, 1.1)
    word, rgb = _thing_colour(c, "pole")
    c.paint((np.abs(c.x - x) <= width / 2) & (c.y <= base) & (c.y >= base - height), rgb, "pole")
    if c.rng.random() < 0.5:  # a small lamp on top
        lamp = c.rng.uniform(1.5, 3.0)
        c.paint((c.x - x) ** 2 + (c.y - (base - height)) ** 2 <= lamp * lamp, c.jitter((250, 230, 120), 5), "pole")
    c.thing_words.append(f"{word} pole")


DRAW_THING: dict[str, Callable[[Canvas, float, float, float], None]] = {
    "ball": _ball,
    "box": _box,
    "tree": _tree,
    "house": _house,
    "pole": _pole,
}


def _ground(c: Canvas, horizon: np.ndarray) -> None:
    """Sky or wall above the horizon, one or two ground bands below it."""
    below = c.y >= horizon[None, :]
    top = "sky" if c.rng.random() < 0.75 else "wall"
    c.paint(~below, STUFF_TEXTURES[top](c), top)
    grounds = list(c.rng.permutation(["grass", "sand", "water"])[: 1 + int(c.rng.random() < 0.5)])
    c.paint(below, STUFF_TEXTURES[grounds[0]](c), grounds[0])
    if len(grounds) == 2:
        second = c.wavy_line(float(c.rng.uniform(horizon.max() + 12, c.size - 14)), c.rng.uniform(1, 5))
        c.paint(c.y >= second[None, :], STUFF_TEXTURES[grounds[1]](c), grounds[1])


def draw_scene(seed: int, size: int = SIZE) -> Scene:
    """The scene of `seed`: same seed, same pixels, labels and caption."""
    c = Canvas(np.random.default_rng(seed), size)
    horizon = c.wavy_line(float(c.rng.uniform(0.28, 0.6) * size), c.rng.uniform(1, 7))
    _ground(c, horizon)
    count = int(c.rng.integers(1, 5))
    bases = np.sort(c.rng.uniform(horizon.max() + 4, size - 2, count))  # farther (higher) things first
    for base in bases:
        thing = THINGS[c.rng.integers(len(THINGS))]
        x = float(c.rng.uniform(0.1, 0.9) * size)
        scale = size * (0.35 + 0.65 * base / size)  # nearer things are bigger
        DRAW_THING[thing](c, x, float(base), scale)
    image = np.clip(c.image + c.rng.normal(0, 3, c.image.shape), 0, 255).astype(np.uint8)
    return Scene(image, c.label, caption(c.label, c.thing_words), seed)


def caption(label: np.ndarray, thing_words: Sequence[str]) -> str:
    """The things as drawn ("a red ball"), then the visible stuff by area: "a red ball and a tree on grass, sky"."""
    counts = np.bincount(label.ravel(), minlength=256)
    stuff = [CLASSES[i] for i in np.argsort(-counts[: len(STUFF)], kind="stable") if counts[i]]
    things = [w for w in dict.fromkeys(thing_words) if counts[CLASS_ID[w.split()[-1]]]]
    named = ", ".join(things[:-1]) + (" and " if len(things) > 1 else "") + (things[-1] if things else "")
    return f"{named} on {', '.join(stuff)}" if named else ", ".join(stuff)


def train_seeds(count: int) -> range:
    """The training scenes' seeds; there are fewer than `VAL_SEED_START`, so none is a validation seed."""
    if not 0 < count <= VAL_SEED_START:
        raise ValueError(f"the toy world has 1..{VAL_SEED_START} training scenes, not {count}")
    return range(count)


def val_seeds(count: int = VAL_SIZE) -> range:
    """The validation scenes' seeds, all at or above `VAL_SEED_START`."""
    return range(VAL_SEED_START, VAL_SEED_START + count)


def scene_id(seed: int) -> str:
    """The file stem of a scene: its split and seed."""
    return f"{'val' if seed >= VAL_SEED_START else 'train'}_{seed:07d}"


def metadata() -> DatasetMetadata:
    """The toy world's ten classes, ignore index and colours."""
    return DatasetMetadata(name="toyworld", classes=CLASSES, ignore_index=IGNORE_INDEX, palette=PALETTE)


class ToyWorld(ListedSplit):
    """The toy world's validation scenes as a labelled split (``data.dataset: toyworld_val``).

    The scenes are drawn once into ``root`` (images/<id>.png, labels/<id>.png, captions.json), so
    every tool reads them as files; a root drawn by another generator version or count is redrawn.
    An `image_list` of scene ids is e.g. a quick ablation on the first scenes.
    """

    DEFAULT_SPLIT = "val"
    LAYOUT = (
        "  (drawn on first use)\n  images/<id>.png   labels/<id>.png (8-bit class ids)   captions.json\n"
        "  toyworld.json   (generator version and scene count)"
    )

    def __init__(
        self,
        root: str | Path,
        split: str | None = None,
        size: int | None = None,
        interpolation: Interpolation = "bicubic",
        image_list: str | Path | None = None,
    ) -> None:
        draw_split(Path(root).expanduser(), val_seeds())
        super().__init__(root, split, size, interpolation, image_list)

    @classmethod
    def metadata(cls, root: str | Path | None = None, **options: object) -> DatasetMetadata:
        """The toy world's classes: the same for any root (the scenes are drawn from seeds)."""
        return metadata()

    def _label_lookup(self) -> np.ndarray:
        lookup = np.full(1 << 16, IGNORE_INDEX, np.int64)
        lookup[: len(CLASSES)] = np.arange(len(CLASSES))
        return lookup

    def _find_samples(self) -> list[Sample]:
        ids = self._listed_ids()
        if ids is None:
            ids = [scene_id(s) for s in val_seeds()]
        return self._samples_from_ids(ids, self.root / "images", ".png", self.root / "labels", ".png")


def draw_split(root: Path, seeds: Sequence[int]) -> None:
    """Draw the scenes of `seeds` into `root` unless it already holds them from this generator version."""
    stamp = {"generator_version": GENERATOR_VERSION, "seeds": [seeds[0], len(seeds)], "size": SIZE}
    marker = root / "toyworld.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    captions = {}
    for seed in seeds:
        scene = draw_scene(seed)
        Image.fromarray(scene.image).save(root / "images" / f"{scene_id(seed)}.png")
        Image.fromarray(scene.label).save(root / "labels" / f"{scene_id(seed)}.png")
        captions[scene_id(seed)] = scene.caption
    (root / "captions.json").write_text(json.dumps(captions, indent=0))
    marker.write_text(json.dumps(stamp))


def draw_arrays(seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The scenes of `seeds` stacked: images [N, H, W, 3] uint8, labels [N, H, W] uint8, captions."""
    scenes = [draw_scene(s) for s in seeds]
    return (np.stack([s.image for s in scenes]), np.stack([s.label for s in scenes]), [s.caption for s in scenes])
