"""The demo's Gradio page: upload or pick a sample photo, K, lambda and (with naming) a vocabulary; the panels.

What the page says about the model and which samples it offers are `ModelNotes` (random weights, the toy
world's miniature model with its scenes, or real weights with scikit-image's photos).

The photo, the k-means masks, the bilinear baseline and EmerDiff side by side, each mask highlighted on
hovering its legend entry; the label PNG, the npz and the COCO JSON to download. Gradio's queue keeps
waiting visitors informed (position, progress bar through the segmentor's stages) instead of blocking.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from emerdiff.predict import render

from .segmenter import KEEP_RESULTS_S, DemoResult, DemoSegmenter, Progress
from .uploads import DISPLAY_SIDE, MAX_UPLOAD, READABLE, DemoInputError, read_upload

MASK_ALPHA = 0.55  # opacity of the mask colours in the panels
TOY_SCENES = 4  # toy-world scenes offered with the toy model
TOY_VOCABULARY = "toyworld"  # the shipped vocabulary of the toy world's ten classes
Panel = tuple[np.ndarray, list[tuple[np.ndarray, str]]]  # a gr.AnnotatedImage value: the photo, (layer, label) pairs


def display_size(shape: tuple[int, int], side: int = DISPLAY_SIDE) -> tuple[int, int]:
    """(height, width) of a panel: the photo's shape scaled to `side` on its longer side."""
    scale = side / max(shape)
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def mask_label(k: int) -> str:
    return f"mask {k}"


def mask_colours(count: int) -> dict[str, str]:
    """Legend label -> hex colour, the label PNG's palette colours (`render.palette`)."""
    return {mask_label(k): "#" + "".join(f"{int(v):02x}" for v in rgb) for k, rgb in enumerate(render.palette(count))}


def annotated_panel(photo_small: np.ndarray, labels: np.ndarray, groups: Sequence[tuple[str, Sequence[int]]]) -> Panel:
    """A gr.AnnotatedImage value: the photo with white mask boundaries, one translucent layer per group of masks.

    `labels` is resized (nearest) to the photo's size; `groups` lists (legend label, mask ids); empty groups are
    left out.
    """
    size = photo_small.shape[:2]
    small = render.resize_nearest(labels, size)
    base = photo_small.copy()
    base[render.boundaries(small, max(1, round(min(size) / 256)))] = 255
    layers = []
    for label, ids in groups:
        mask = np.isin(small, list(ids))
        if mask.any():
            layers.append((mask.astype(np.float32) * MASK_ALPHA, label))
    return base, layers


def shown_photo(photo: np.ndarray) -> np.ndarray:
    """The photo at panel size (`display_size`), the base picture of every panel."""
    h, w = display_size(photo.shape[:2])
    return np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR))


def panels(result: DemoResult) -> dict[str, Any]:
    """The page's pictures for one result: photo, k-means, bilinear, EmerDiff (gr.AnnotatedImage values)."""
    out = result.output
    small = shown_photo(result.upload.photo)
    by_mask = [(mask_label(k), [k]) for k in range(result.num_masks)]
    if result.names is None:
        named = by_mask
    else:  # one legend entry per class: the masks it names, highlighted together
        classes: dict[str, list[int]] = {}
        for k in range(result.num_masks):
            classes.setdefault(result.names.name(k) or "(no class)", []).append(k)
        named = sorted(classes.items())
    return {
        "photo": (small, []),
        "kmeans": annotated_panel(small, out.lowres_labels.numpy(), by_mask),
        "bilinear": annotated_panel(small, out.labels_bilinear.numpy(), by_mask),
        "emerdiff": annotated_panel(small, out.labels.numpy(), named),
    }


def summary(result: DemoResult, model_note: str | None = None) -> str:
    """Markdown under the panels: what ran, the notes on the upload and the model, and the masks (with classes when
    named)."""
    h, w = result.output.lowres_labels.shape
    lines = [
        f"**{result.num_masks} masks** (k-means on the {h}x{w} feature grid) in {result.seconds:.1f} s; "
        f"seed {result.output.seed}."
    ]
    lines += [f"- note: {note}" for note in result.upload.notes]
    if model_note:
        lines.append(f"- note: {model_note}")
    rows = result.mask_table()
    if result.names is not None:
        lines += ["", "| mask | class | score | share of the photo |", "|---:|---|---:|---:|"]
        for r in rows:
            score = "-" if r["score"] is None else f"{r['score']:.3f}"
            lines.append(f"| {r['mask']} | {r['class'] or '-'} | {score} | {r['share']:.1%} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Samples:
    """Pictures a visitor can click instead of uploading one, under a heading that says what they are."""

    heading: str
    paths: list[Path]


def sample_photos(folder: str | Path) -> Samples:
    """scikit-image's sample photos written into `folder` (none when scikit-image is not installed)."""
    try:
        from skimage import data
    except ImportError:
        return Samples("", [])
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = folder / f"{name}.jpg"
        if not path.is_file():
            Image.fromarray(getattr(data, name)()).save(path, quality=92)
        written.append(path)
    return Samples("Sample photos (scikit-image)", written)


def toy_scenes(folder: str | Path, count: int = TOY_SCENES) -> Samples:
    """The first `count` validation scenes of the toy world (seeds the toy model never trained on), as PNG files
    named by scene id in `folder`: what the toy model can segment."""
    from emerdiff.data.toyworld import draw_scene, scene_id, val_seeds

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for seed in val_seeds(count):
        path = folder / f"{scene_id(seed)}.png"
        if not path.is_file():
            Image.fromarray(draw_scene(seed).image).save(path)
        written.append(path)
    return Samples("Toy-world scenes (synthetic validation scenes the toy model never trained on)", written)


@dataclass(frozen=True)
class ModelNotes:
    """What the page says about the model it serves (under the introduction and in every result), the samples it
    offers and the vocabulary it starts with."""

    notice: str | None = None  # shown under the introduction
    result_note: str | None = None  # a note in every result's summary
    samples: Callable[[Path], Samples] | None = sample_photos  # writes the samples into a folder; None: none
    vocabulary: str = ""

    @classmethod
    def random_weights(cls, notice: str) -> ModelNotes:
        """A miniature model with random weights: the masks carry no meaning."""
        return cls(notice, "miniature model with random weights: the masks carry no meaning.")

    @classmethod
    def toy(cls, notice: str) -> ModelNotes:
        """The toy world's trained miniature model: toy-world scenes to click, named with the world's classes."""
        return cls(
            notice,
            "the toy world's miniature model, trained on synthetic scenes; not Stable Diffusion.",
            toy_scenes,
            TOY_VOCABULARY,
        )


INTRO = """# EmerDiff: segmentation from a frozen Stable Diffusion
Upload a photo (or pick a sample), choose K and lambda, press **Segment**. The panels show the photo, the
k-means masks on the UNet's feature grid, their bilinear upsampling (the baseline) and EmerDiff's masks;
hover a legend entry to highlight its mask, click it for details."""


class DemoPage:
    """The page's event handlers, callable without a browser: a visitor's mistake raises gr.Error with its message."""

    def __init__(self, segmenter: DemoSegmenter, notes: ModelNotes = ModelNotes()) -> None:
        self.segmenter = segmenter
        self.notes = notes

    def preview(self, path: str | None) -> Panel | None:
        """The uploaded photo at panel size, as soon as it is uploaded (a bad file is reported at once).

        The upload's notes are shown here, once; `segment` lists them in its summary but does not repeat them
        (a second identical warning made the toast show the message twice)."""
        if not path:
            return None
        upload = self._checked(read_upload, path, self.segmenter.max_pixels, self.segmenter.max_side)
        self._warn(upload.notes)
        return shown_photo(upload.photo), []

    def segment(
        self, path: str | None, num_masks: float, lam: float, vocabulary: str = "", progress: Progress | None = None
    ) -> tuple[Any, ...]:
        """The four panels, the summary, the downloads, the mask rows and a cleared selection."""
        import gradio as gr

        if not path:
            raise gr.Error("Upload a photo or pick a sample first.", print_exception=False)
        result = self._checked(self.segmenter.run, path, num_masks, lam, vocabulary, progress=progress)
        pictures = panels(result)
        return (
            pictures["photo"],
            pictures["kmeans"],
            pictures["bilinear"],
            pictures["emerdiff"],
            summary(result, self.notes.result_note),
            [str(f) for f in result.files],
            result.mask_table(),
            "",
        )

    @staticmethod
    def describe(rows: list[dict[str, Any]] | None, label: str) -> str:
        """What a clicked legend entry (a mask, or a class of masks) covers."""
        chosen = [r for r in rows or [] if label in (mask_label(r["mask"]), r.get("class"))]
        parts = []
        for r in chosen:
            named = f", class **{r['class']}**" if r.get("class") else ""
            score = f" (score {r['score']:.3f})" if r.get("score") is not None else ""
            parts.append(f"mask {r['mask']}: {r['share']:.1%} of the photo{named}{score}")
        return f"**{label}**: " + "; ".join(parts) if parts else ""

    @staticmethod
    def _checked(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import gradio as gr

        try:
            return function(*args, **kwargs)
        except DemoInputError as exc:
            raise gr.Error(str(exc), print_exception=False) from None

    @staticmethod
    def _warn(notes: Sequence[str]) -> None:
        import gradio as gr

        for note in notes:
            gr.Warning(note)


def build_demo(segmenter: DemoSegmenter, samples: Samples | None = None, notes: ModelNotes = ModelNotes()) -> Any:
    """The Gradio Blocks of the demo (not launched: see `serve`)."""
    import gradio as gr

    page = DemoPage(segmenter, notes)
    params = segmenter.params
    colours = mask_colours(segmenter.max_masks)

    def segment(
        path: str | None, num_masks: float, lam: float, vocabulary: str, progress: Any = gr.Progress()
    ) -> tuple[Any, ...]:  # Gradio fills `progress` (found by its default)
        return page.segment(
            path, num_masks, lam, vocabulary, progress=lambda fraction, text: progress(fraction, desc=text)
        )

    def describe(rows: list[dict[str, Any]] | None, evt: gr.SelectData) -> str:
        return page.describe(rows, str(evt.value))

    describe.__annotations__["evt"] = gr.SelectData  # Gradio finds the event argument by its type (not a string)

    with gr.Blocks(title="EmerDiff demo", delete_cache=(KEEP_RESULTS_S, KEEP_RESULTS_S)) as app:
        gr.Markdown(INTRO + (f"\n\n> {notes.notice}" if notes.notice else ""), elem_id="intro")
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label=f"Photo ({READABLE})", file_count="single", type="filepath", elem_id="upload")
                if samples is not None and samples.paths:
                    gr.Examples(
                        examples=[[str(p)] for p in samples.paths],
                        inputs=[upload],
                        label=samples.heading,
                        elem_id="samples",
                    )
            with gr.Column(scale=3):
                num_masks = gr.Slider(
                    1,
                    segmenter.max_masks,
                    value=params.num_masks,
                    step=1,
                    elem_id="num-masks",
                    label="K: number of k-means masks (segmentor.num_masks)",
                )
                lam = gr.Slider(
                    0.5,
                    max(50.0, params.lam),
                    value=params.lam,
                    step=0.5,
                    elem_id="lam",
                    label="lambda: modulation strength (segmentor.lam)",
                )
                vocabulary = gr.Textbox(
                    value=notes.vocabulary,
                    elem_id="vocabulary",
                    label="Vocabulary (optional): name the masks with CLIP",
                    placeholder="cat, dog, grass   or a shipped one: coco, ade150, pc59, voc",
                    visible=segmenter.naming is not None,
                )
                button = gr.Button("Segment", variant="primary", elem_id="segment")
        # The photo is an AnnotatedImage without layers, so that it is drawn at the size and place of the other
        # three (a gr.Image scales a photo down only). Unequal heights: a panel stretched to the row's height draws
        # its layers centred in the taller box but its photo at the top (a shorter legend moved the masks down).
        with gr.Row(equal_height=False):
            photo = gr.AnnotatedImage(label="photo", elem_id="panel-photo")
            kmeans = gr.AnnotatedImage(label="k-means masks (feature grid)", color_map=colours, elem_id="panel-kmeans")
            bilinear = gr.AnnotatedImage(label="bilinear upsampling", color_map=colours, elem_id="panel-bilinear")
            emerdiff = gr.AnnotatedImage(label="EmerDiff", color_map=colours, elem_id="panel-emerdiff")
        selected = gr.Markdown(elem_id="selected")
        info = gr.Markdown(elem_id="summary")
        downloads = gr.File(
            label="Downloads: label PNG (palette = mask colours), npz arrays, COCO JSON (RLE masks)",
            file_count="multiple",
            interactive=False,
            elem_id="downloads",
        )
        rows = gr.State()

        upload.change(page.preview, inputs=upload, outputs=photo, concurrency_limit=4)
        button.click(
            segment,
            inputs=[upload, num_masks, lam, vocabulary],
            outputs=[photo, kmeans, bilinear, emerdiff, info, downloads, rows, selected],
            concurrency_limit=1,
            concurrency_id="segment",
        )
        for panel in (kmeans, bilinear, emerdiff):
            panel.select(describe, inputs=rows, outputs=selected)
    return app


def serve(
    segmenter: DemoSegmenter,
    host: str = "127.0.0.1",
    port: int | None = None,
    notes: ModelNotes = ModelNotes(),
    queue_size: int = 32,
) -> None:
    """Build the page and serve it until interrupted (Ctrl-C or SIGTERM); visitors wait in Gradio's queue (up to
    `queue_size`). The server is closed on the way out."""
    samples = notes.samples(segmenter.workdir / "samples") if notes.samples else None
    app = build_demo(segmenter, samples, notes)
    app.queue(max_size=queue_size)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        app.launch(
            server_name=host,
            server_port=port,
            allowed_paths=[str(segmenter.workdir)],
            show_error=False,
            max_file_size=MAX_UPLOAD,
        )
    finally:
        app.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # so that `finally` blocks run (the server closes, the tool removes its files)
