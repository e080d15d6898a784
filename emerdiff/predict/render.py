"""Pictures of label maps: palette, label PNG, colour overlay with boundaries, side-by-side figure, titled grid,
class legend."""

from __future__ import annotations

import colorsys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GOLDEN = 0.6180339887498949
FIGURE_HEIGHT = 512  # figure panels are shrunk to at most this height
TITLE_HEIGHT = 22


@dataclass(frozen=True)
class NamedLabels:
    """A per-pixel class map (ids into `names`; negative = no class) and the class names, for a legend."""

    labels: np.ndarray
    names: Sequence[str]


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours [n, 3] uint8: hues a golden-ratio step apart, saturation and brightness varied."""
    colours = [
        colorsys.hsv_to_rgb((i * GOLDEN) % 1.0, 0.75 - 0.2 * (i // 3 % 2), 0.95 - 0.25 * (i % 3 == 2)) for i in range(n)
    ]
    return (np.asarray(colours, dtype=np.float64).reshape(n, 3) * 255 + 0.5).astype(np.uint8)


def label_image(labels: np.ndarray, num_masks: int) -> Image.Image:
    """An 8-bit palette image when ``num_masks <= 255``, else 16-bit grayscale; pixel value = label."""
    if num_masks <= 255:
        img = Image.fromarray(labels.astype(np.uint8))
        img.putpalette(palette(max(num_masks, 1)).flatten().tolist())  # "L" becomes "P"
        return img
    return Image.fromarray(labels.astype(np.uint16))


def colorize(labels: np.ndarray, num_colours: int) -> np.ndarray:
    """[H, W] labels -> [H, W, 3] uint8 palette colours."""
    return palette(max(num_colours, int(labels.max()) + 1))[labels]


def boundaries(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Pixels whose right or lower neighbour has another label, thickened to ``width`` pixels."""
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    for _ in range(width - 1):
        grown = edge.copy()
        grown[1:, :] |= edge[:-1, :]
        grown[:, 1:] |= edge[:, :-1]
        edge = grown
    return edge


def overlay(photo: np.ndarray, labels: np.ndarray, num_masks: int, alpha: float = 0.5) -> np.ndarray:
    """Mask colours blended over the photo [H, W, 3] uint8, with white mask boundaries."""
    blend = (1 - alpha) * photo.astype(np.float32) + alpha * colorize(labels, num_masks).astype(np.float32)
    out = (blend + 0.5).astype(np.uint8)
    out[boundaries(labels, max(1, round(min(labels.shape) / 256)))] = 255
    return out


def resize_nearest(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Integer map resized by picking the nearest source pixel (no label mixing)."""
    rows = (np.arange(size[0]) + 0.5) * labels.shape[0] / size[0]
    cols = (np.arange(size[1]) + 0.5) * labels.shape[1] / size[1]
    return labels[rows.astype(np.int64)[:, None], cols.astype(np.int64)[None, :]]


def figure(
    photo: np.ndarray,
    lowres_labels: np.ndarray,
    labels_bilinear: np.ndarray,
    labels: np.ndarray,
    num_masks: int,
    alpha: float = 0.5,
    classes: NamedLabels | None = None,
) -> Image.Image:
    """One row: photo | low-res k-means masks | bilinear upsampling | EmerDiff labels, titled.

    With `classes` (a run that named its masks) a fifth panel shows the classes, and a legend of the classes
    present goes below the row.
    """
    height, width = labels.shape
    scale = min(1.0, FIGURE_HEIGHT / height)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    small = np.asarray(Image.fromarray(photo).resize(size[::-1], Image.Resampling.BILINEAR))
    panels = [small] + [
        overlay(small, resize_nearest(m, size), num_masks, alpha) for m in (lowres_labels, labels_bilinear, labels)
    ]
    h, w = lowres_labels.shape
    titles = ["photo", f"k-means {h}x{w} ({num_masks} masks)", "bilinear upsampling", "EmerDiff"]
    if classes is None:
        return titled_grid([panels], titles)
    panels.append(class_overlay(small, resize_nearest(classes.labels, size), len(classes.names), alpha))
    return with_legend(titled_grid([panels], [*titles, "classes"]), classes)


def class_fill(labels: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """[H, W] class ids -> [H, W, 3] uint8 solid class colours (`colours` [C, 3]), black where the id is negative."""
    named = labels >= 0
    filled = np.asarray(colours, dtype=np.uint8)[np.where(named, labels, 0)]
    filled[~named] = 0
    return filled


def class_overlay(photo: np.ndarray, labels: np.ndarray, num_classes: int, alpha: float = 0.5) -> np.ndarray:
    """Class colours over the photo; pixels with a negative id (no class) keep the photo's colours."""
    named = labels >= 0
    blended = overlay(photo, np.where(named, labels, 0), num_classes, alpha)
    blended[~named] = photo[~named]
    return blended


def legend_overlay(
    photo: np.ndarray, labels: np.ndarray, class_names: Sequence[str], alpha: float = 0.5
) -> Image.Image:
    """Class colours over the photo with a legend (colour swatch + name) of the classes present, below it."""
    picture = Image.fromarray(class_overlay(photo, labels, len(class_names), alpha))
    return with_legend(picture, NamedLabels(labels, class_names))


def with_legend(
    picture: Image.Image, classes: NamedLabels, colours: np.ndarray | None = None, across: bool = False
) -> Image.Image:
    """`picture` with a colour swatch (`colours` [C, 3], by default `palette`'s) and the name of each class present in
    `classes.labels` below it: one class a line, or side by side in lines as wide as the picture (`across`)."""
    present = [int(c) for c in np.unique(classes.labels) if c >= 0]
    if colours is None:
        colours = palette(max(len(classes.names), 1))
    row = TITLE_HEIGHT
    width, height = picture.size
    font = ImageFont.load_default(size=15)
    places, x, line = [], 0, 0  # each entry's left edge and line
    for c in present:
        entry = row + 14 + round(font.getlength(str(classes.names[c])))
        if x and (not across or x + entry > width):
            x, line = 0, line + 1
        places.append((x, line))
        x += entry
    canvas = Image.new("RGB", (width, height + row * (line + 1)), "white")
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for c, (left, line) in zip(present, places, strict=True):
        top = height + line * row
        draw.rectangle([left + 4, top + 4, left + row - 4, top + row - 4], fill=tuple(int(v) for v in colours[c]))
        draw.text((left + row + 2, top + 3), str(classes.names[c]), fill="black", font=font)
    return canvas


def titled_grid(rows: Sequence[Sequence[np.ndarray]], titles: Sequence[str]) -> Image.Image:
    """Panels [H, W, 3] uint8 in rows under one title per column, each in the top-left corner of a cell as large as
    the largest panel (white around smaller ones)."""
    height = max(panel.shape[0] for row in rows for panel in row)
    width = max(panel.shape[1] for row in rows for panel in row)
    canvas = Image.new("RGB", (width * len(titles), TITLE_HEIGHT + height * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=15)  # Pillow's own font; a small bitmap one without FreeType
    for r, row in enumerate(rows):
        for i, (panel, _) in enumerate(zip(row, titles, strict=True)):
            canvas.paste(Image.fromarray(panel), (i * width, TITLE_HEIGHT + r * height))
    for i, title in enumerate(titles):
        draw.text((i * width + 4, 3), title, fill="black", font=font)
    return canvas
