"""The browser demo: one photo in, the four panels of EmerDiff out (Gradio, an optional extra).

    pip install -e ".[demo]"
    python tools/demo.py --cfg configs/tiny.yaml          # then open http://127.0.0.1:7860

Two layers, so the segmentation can be used (and tested) without a browser:

- `DemoSegmenter` holds the Stable Diffusion components loaded once at start-up and segments one
  upload per call with the visitor's K and lambda: each (K, lambda) gets a light `EmerDiff` of its
  own on the shared components (`replace(params, num_masks=K, lam=lam)`; the last few are kept), so
  no visitor changes what another one runs, and a lock runs one segmentation at a time (the UNet's
  attention processors are swapped during a run). Uploads are checked first (`read_upload`): a file that is not an
  image, or one too large, raises `DemoInputError` with a message for the page.
- `build_demo` lays out the Gradio page: upload or pick a sample photo, K, lambda and (with a
  namer) a vocabulary; the photo, the k-means masks, the bilinear baseline and EmerDiff side by
  side, each mask highlighted on hovering its legend entry; the label PNG, the npz and the COCO
  JSON (`emerdiff.predict.export`) to download. Gradio's queue keeps waiting
  visitors informed (position, progress bar through the segmentor's stages) instead of blocking.

Naming masks with CLIP lives in `ovseg`, which emerdiff never imports: the tool plugs it in as a
`Namer`, a callable ``namer(photo, output, vocabulary) -> MaskClasses``.
"""

from __future__ import annotations

import json
import shutil
import signal
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .config import SegmentorConfig
from .image import load_image
from .models import SDComponents
from .predict import render
from .predict.export import ImageMasks, coco_dict
from .profiling import STAGES
from .segmentor import EmerDiff, SegmentationOutput, StageContext, untimed

MAX_UPLOAD = "100mb"  # Gradio refuses larger files in the page before they are sent
MAX_PIXELS = 40_000_000  # uploads above this are refused (8000 x 5000); PIL itself refuses bombs above ~179 MP
MAX_SIDE = 2048  # larger photos are shrunk to this longer side first (labels come back at the shrunk size)
MIN_SIDE = 16  # smaller pictures are refused: there is nothing to segment
DISPLAY_SIDE = 512  # panels are shown at most this large (the downloads keep the photo's size)
MASK_ALPHA = 0.55  # opacity of the mask colours in the panels
MAX_MASKS = 40  # the K slider's upper end (or the config's K when larger)
KEEP_RESULTS_S = 3600  # downloads of older requests are deleted
DOWNLOADS = "downloads"  # WORKDIR/downloads/REQUEST/NAME.png, .npz, _coco.json
KEEP_SEGMENTORS = 8  # per-(K, lambda) segmentors kept, with their chunk plans
READABLE = "PNG, JPEG, BMP, TIFF or WebP"

STAGE_TITLES = {
    "encode": "encoding the photo (VAE)",
    "features": "UNet features",
    "kmeans": "k-means",
    "inversion": "inversion",
    "modulated": "modulated denoising",
    "decode": "decoding the variants (VAE)",
    "assignment": "assigning every pixel",
    "naming": "naming the masks (CLIP)",
}


class DemoInputError(ValueError):
    """An upload or a setting the demo cannot use; the message is meant for the visitor."""


@dataclass(frozen=True)
class MaskClasses:
    """What a namer says about one image's masks, in vocabulary ids."""

    class_names: Sequence[str]  # the vocabulary's display names, by id
    mask_classes: np.ndarray  # [K] int64 vocabulary id of each mask; negative: no class (e.g. an empty mask)
    mask_scores: np.ndarray  # [K] float score of each mask's class (NaN where none)

    def name(self, mask: int) -> Optional[str]:
        """The class name of `mask`, or None."""
        c = int(self.mask_classes[mask])
        return self.class_names[c] if c >= 0 else None

    def arrays(self, labels: np.ndarray) -> Dict[str, np.ndarray]:
        """The npz entries tools/predict.py writes too: ov_labels, mask_classes, mask_scores, class_names."""
        return {"ov_labels": self.mask_classes[labels], "mask_classes": self.mask_classes,
                "mask_scores": self.mask_scores, "class_names": np.asarray(list(self.class_names))}


Namer = Callable[[np.ndarray, SegmentationOutput, str], MaskClasses]  # (photo HxWx3 uint8, output, vocabulary text)
Progress = Callable[[float, str], None]  # (fraction done, what runs now)


@dataclass
class Upload:
    """A checked upload: the photo to segment, its name, and notes for the visitor (e.g. it was shrunk)."""

    photo: np.ndarray  # [H, W, 3] uint8
    name: str  # the file name without its suffix: the downloads are NAME.png, NAME.npz, NAME_coco.json
    file_name: str  # the uploaded file's name (COCO's images[].file_name)
    notes: List[str] = field(default_factory=list)


@dataclass
class DemoResult:
    """One segmentation in the demo: the photo, the output, the names, the files to download."""

    upload: Upload
    output: SegmentationOutput
    names: Optional[MaskClasses]
    seconds: float
    files: List[Path]

    @property
    def num_masks(self) -> int:
        return self.output.num_masks

    def mask_table(self) -> List[Dict[str, Any]]:
        """One row per mask: id, share of the photo's pixels, class and score when named."""
        labels = self.output.labels.numpy()
        share = np.bincount(labels.ravel(), minlength=self.num_masks) / labels.size
        rows = []
        for k in range(self.num_masks):
            row: Dict[str, Any] = {"mask": k, "share": float(share[k])}
            if self.names is not None:
                score = float(self.names.mask_scores[k])
                row.update({"class": self.names.name(k), "score": None if np.isnan(score) else score})
            rows.append(row)
        return rows


def read_upload(path: str | Path, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> Upload:
    """Open an uploaded file as an RGB photo, or raise DemoInputError saying what is wrong with it.

    Grayscale, palette, 16-bit and RGBA images are accepted (colour replicated, alpha dropped, as
    the prediction tool does), with a note; EXIF rotation is applied; a photo whose longer side is
    above `max_side` is shrunk to it, with a note; above `max_pixels` it is refused before decoding.
    """
    path = Path(path)
    name = path.stem or "upload"
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise DemoInputError(
                    f"'{path.name}' is {width} x {height} pixels ({width * height / 1e6:.0f} MP); "
                    f"the demo takes photos "
                    f"up to {max_pixels / 1e6:.0f} MP. Shrink it first (segmentation runs at "
                    f"{DISPLAY_SIDE}-ish pixels anyway).")
            img.load()
            mode = img.mode
            transparent = mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info)
            img = ImageOps.exif_transpose(img)
            photo = (load_image(img) * 255).round().byte().permute(1, 2, 0).numpy()
    except DemoInputError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise DemoInputError(f"'{path.name}' is not an image the demo can read; upload a {READABLE} photo.") from exc
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt file, unsupported mode
        raise DemoInputError(f"'{path.name}' could not be read as an image ({exc}); "
                             f"upload a {READABLE} photo.") from exc
    notes = []
    if mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
        notes.append("grayscale photo: segmented as RGB (gray in every channel)")
    if transparent:
        notes.append("transparency ignored: the colour channels are segmented as they are")
    if min(photo.shape[:2]) < MIN_SIDE:
        raise DemoInputError(f"'{path.name}' is only {photo.shape[1]} x {photo.shape[0]} pixels; "
                             f"give a photo at least {MIN_SIDE} pixels on each side.")
    if max(photo.shape[:2]) > max_side:
        scale = max_side / max(photo.shape[:2])
        size = (max(1, round(photo.shape[1] * scale)), max(1, round(photo.shape[0] * scale)))
        notes.append(f"shrunk from {photo.shape[1]} x {photo.shape[0]} to {size[0]} x {size[1]} pixels")
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.LANCZOS))
    return Upload(photo=np.ascontiguousarray(photo), name=name, file_name=path.name, notes=notes)


def stage_reporter(report: Progress, stages: Sequence[str]) -> StageContext:
    """A context-manager factory for `EmerDiff.stage` that reports each of `stages` to `report` as it starts.

    A stage entered again (the segmentor opens some twice) or an unknown one is not reported again: the
    bar only moves forward.
    """
    last = -1

    @contextmanager
    def stage(name: str) -> Iterator[None]:
        nonlocal last
        step = stages.index(name) if name in stages else -1
        if step > last:
            last = step
            report(step / len(stages), f"{step + 1}/{len(stages)} {STAGE_TITLES.get(name, name)}")
        yield

    return stage


class DemoSegmenter:
    """Segments uploads for the demo with the SD components of `model`, loaded once; safe from several threads.

    `model` (e.g. ``EmerDiff.from_config(cfg)``) gives the components and the settings; each request's K and
    lambda run on a light copy of it (`segmentor`), and `model` itself is never changed.
    """

    def __init__(self, model: EmerDiff, namer: Optional[Namer] = None, workdir: Optional[str | Path] = None,
                 max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> None:
        self.base = model
        self.components: SDComponents = model.components
        self.params: SegmentorConfig = model.params
        self.namer = namer
        self.max_pixels = max_pixels
        self.max_side = max_side
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="emerdiff-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._counter = 0
        self._segmentors: "OrderedDict[Tuple[int, float], EmerDiff]" = OrderedDict()

    @property
    def max_masks(self) -> int:
        return max(MAX_MASKS, self.params.num_masks)

    def segmentor(self, num_masks: int, lam: float) -> EmerDiff:
        """A light EmerDiff with this request's K and lambda on the shared components (the last few are kept)."""
        try:
            k, lam = float(num_masks), float(lam)
        except (TypeError, ValueError):
            raise DemoInputError(f"K and lambda must be numbers, got {num_masks!r} and {lam!r}") from None
        if int(k) != k or not 1 <= k <= self.max_masks:
            raise DemoInputError(f"K (segmentor.num_masks) must be a whole number from 1 to {self.max_masks}, "
                                 f"got {num_masks}")
        if not np.isfinite(lam) or lam <= 0:
            raise DemoInputError(f"lambda (segmentor.lam) must be a positive number, got {lam}")
        key = (int(k), lam)
        with self._lock:
            if key not in self._segmentors:
                # The shared modules were converted/compiled by `self.base` already: the copy must not redo it.
                params = replace(self.params, num_masks=key[0], lam=lam, channels_last=False, compile=False)
                self._segmentors[key] = EmerDiff(self.components, params).to(self.base.device)
                while len(self._segmentors) > KEEP_SEGMENTORS:
                    self._segmentors.popitem(last=False)
            self._segmentors.move_to_end(key)
            return self._segmentors[key]

    def run(self, path: str | Path, num_masks: int, lam: float, vocabulary: str = "",
            progress: Optional[Progress] = None) -> DemoResult:
        """Check the upload, segment it with K and lambda, name the masks with `vocabulary`, write the downloads."""
        upload = read_upload(path, self.max_pixels, self.max_side)
        vocabulary = (vocabulary or "").strip()
        if vocabulary and self.namer is None:
            raise DemoInputError("this demo was started without mask naming; leave the vocabulary empty")
        report = progress or (lambda fraction, text: None)
        stages = list(STAGES) + (["naming"] if vocabulary else [])
        model = self.segmentor(num_masks, lam)
        with self._lock:  # one run at a time: a run swaps the shared UNet's attention processors
            model.stage = stage_reporter(report, stages)
            try:
                start = time.perf_counter()
                output = model.segment(upload.photo)
                names = None
                if vocabulary:
                    with model.stage("naming"):
                        try:
                            names = self.namer(upload.photo, output, vocabulary)
                        except (ValueError, FileNotFoundError) as exc:  # unknown vocabulary, duplicate names, ...
                            raise DemoInputError(f"vocabulary: {exc}") from None
                seconds = time.perf_counter() - start
            finally:
                model.stage = untimed
        report(1.0, "writing the downloads")
        files = self.write_files(upload, output, names)
        return DemoResult(upload=upload, output=output, names=names, seconds=seconds, files=files)

    def write_files(self, upload: Upload, output: SegmentationOutput, names: Optional[MaskClasses]) -> List[Path]:
        """NAME.png (label map, palette = mask colours), NAME.npz (every array), NAME_coco.json (RLE masks)."""
        self._prune()
        with self._lock:
            self._counter += 1
            folder = self.workdir / DOWNLOADS / f"{time.time():.0f}-{self._counter}"
        folder.mkdir(parents=True)
        arrays = output.to_numpy() | (names.arrays(output.labels.numpy()) if names is not None else {})
        label_png = folder / f"{upload.name}.png"
        render.label_image(arrays["labels"], output.num_masks).save(label_png, format="PNG")
        npz = folder / f"{upload.name}.npz"
        np.savez_compressed(npz, **arrays)
        coco = folder / f"{upload.name}_coco.json"
        coco.write_text(json.dumps(coco_dict([ImageMasks.from_arrays(upload.name, upload.file_name, arrays)])))
        return [label_png, npz, coco]

    def _prune(self) -> None:
        """Delete the downloads of requests older than KEEP_RESULTS_S."""
        cutoff = time.time() - KEEP_RESULTS_S
        for folder in (self.workdir / DOWNLOADS).glob("*"):
            if folder.is_dir() and folder.stat().st_mtime < cutoff:
                shutil.rmtree(folder, ignore_errors=True)


# --- pictures for the page -------------------------------------------------------------------------------------------

def display_size(shape: Tuple[int, int], side: int = DISPLAY_SIDE) -> Tuple[int, int]:
    """(height, width) of a panel: the photo's shape scaled to `side` on its longer side."""
    scale = side / max(shape)
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def mask_label(k: int) -> str:
    return f"mask {k}"


def mask_colours(count: int) -> Dict[str, str]:
    """Legend label -> hex colour, the label PNG's palette colours (`render.palette`)."""
    return {mask_label(k): "#%02x%02x%02x" % tuple(int(v) for v in rgb) for k, rgb in enumerate(render.palette(count))}


def annotated_panel(photo_small: np.ndarray, labels: np.ndarray, groups: Sequence[Tuple[str, Sequence[int]]]
                    ) -> Tuple[np.ndarray, List[Tuple[np.ndarray, str]]]:
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


def panels(result: DemoResult) -> Dict[str, Any]:
    """The page's pictures for one result: photo, k-means, bilinear, EmerDiff (gr.Image / gr.AnnotatedImage values)."""
    out = result.output
    photo = result.upload.photo
    h, w = display_size(photo.shape[:2])
    small = np.asarray(Image.fromarray(photo).resize((w, h), Image.BILINEAR))
    by_mask = [(mask_label(k), [k]) for k in range(result.num_masks)]
    if result.names is None:
        named = by_mask
    else:  # one legend entry per class: the masks it names, highlighted together
        classes: Dict[str, List[int]] = {}
        for k in range(result.num_masks):
            classes.setdefault(result.names.name(k) or "(no class)", []).append(k)
        named = sorted(classes.items())
    return {
        "photo": small,
        "kmeans": annotated_panel(small, out.lowres_labels.numpy(), by_mask),
        "bilinear": annotated_panel(small, out.labels_bilinear.numpy(), by_mask),
        "emerdiff": annotated_panel(small, out.labels.numpy(), named),
    }


def summary(result: DemoResult, random_weights: bool = False) -> str:
    """Markdown under the panels: what ran, the notes on the upload, and the masks (with classes when named)."""
    h, w = result.output.lowres_labels.shape
    lines = [f"**{result.num_masks} masks** (k-means on the {h}x{w} feature grid) in {result.seconds:.1f} s; "
             f"seed {result.output.seed}."]
    lines += [f"- note: {note}" for note in result.upload.notes]
    if random_weights:
        lines.append("- note: miniature model with random weights: the masks carry no meaning.")
    rows = result.mask_table()
    if result.names is not None:
        lines += ["", "| mask | class | score | share of the photo |", "|---:|---|---:|---:|"]
        for r in rows:
            score = "-" if r["score"] is None else f"{r['score']:.3f}"
            lines.append(f"| {r['mask']} | {r['class'] or '-'} | {score} | {r['share']:.1%} |")
    return "\n".join(lines)


def sample_photos(folder: str | Path) -> List[Path]:
    """scikit-image's sample photos written into `folder` (none when scikit-image is not installed)."""
    try:
        from skimage import data
    except ImportError:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        path = folder / f"{name}.jpg"
        if not path.is_file():
            Image.fromarray(getattr(data, name)()).save(path, quality=92)
        written.append(path)
    return written


# --- the Gradio page ----------------------------------------------------------------------------------------------

INTRO = """# EmerDiff: segmentation from a frozen Stable Diffusion
Upload a photo (or pick a sample), choose K and lambda, press **Segment**. The panels show the photo, the
k-means masks on the UNet's feature grid, their bilinear upsampling (the baseline) and EmerDiff's masks;
hover a legend entry to highlight its mask, click it for details."""


class DemoPage:
    """The page's event handlers, callable without a browser: a visitor's mistake raises gr.Error with its message."""

    def __init__(self, segmenter: DemoSegmenter, notice: Optional[str] = None) -> None:
        self.segmenter = segmenter
        self.notice = notice  # the random-weights note, or None for real weights

    def preview(self, path: Optional[str]) -> Optional[np.ndarray]:
        """The uploaded photo at panel size, as soon as it is uploaded (a bad file is reported at once)."""
        if not path:
            return None
        upload = self._checked(read_upload, path, self.segmenter.max_pixels, self.segmenter.max_side)
        self._warn(upload.notes)
        h, w = display_size(upload.photo.shape[:2])
        return np.asarray(Image.fromarray(upload.photo).resize((w, h), Image.BILINEAR))

    def segment(self, path: Optional[str], num_masks: float, lam: float, vocabulary: str = "",
                progress: Optional[Progress] = None) -> Tuple[Any, ...]:
        """The four panels, the summary, the downloads, the mask rows and a cleared selection."""
        import gradio as gr

        if not path:
            raise gr.Error("Upload a photo or pick a sample first.", print_exception=False)
        result = self._checked(self.segmenter.run, path, num_masks, lam, vocabulary, progress=progress)
        self._warn(result.upload.notes)
        pictures = panels(result)
        return (pictures["photo"], pictures["kmeans"], pictures["bilinear"], pictures["emerdiff"],
                summary(result, self.notice is not None), [str(f) for f in result.files], result.mask_table(), "")

    @staticmethod
    def describe(rows: Optional[List[Dict[str, Any]]], label: str) -> str:
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


def build_demo(segmenter: DemoSegmenter, samples: Sequence[str | Path] = (), notice: Optional[str] = None) -> Any:
    """The Gradio Blocks of the demo (not launched: see `serve`)."""
    import gradio as gr

    page = DemoPage(segmenter, notice)
    params = segmenter.params
    colours = mask_colours(segmenter.max_masks)

    def segment(path: Optional[str], num_masks: float, lam: float, vocabulary: str,
                progress: Any = gr.Progress()) -> Tuple[Any, ...]:  # Gradio fills `progress` (found by its default)
        return page.segment(path, num_masks, lam, vocabulary,
                            progress=lambda fraction, text: progress(fraction, desc=text))

    def describe(rows: Optional[List[Dict[str, Any]]], evt: gr.SelectData) -> str:
        return page.describe(rows, str(evt.value))

    describe.__annotations__["evt"] = gr.SelectData  # Gradio finds the event argument by its type (not a string)

    with gr.Blocks(title="EmerDiff demo", delete_cache=(KEEP_RESULTS_S, KEEP_RESULTS_S)) as app:
        gr.Markdown(INTRO + (f"\n\n> {notice}" if notice else ""))
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label=f"Photo ({READABLE})", file_count="single", type="filepath", elem_id="upload")
                if samples:
                    gr.Examples(examples=[[str(p)] for p in samples], inputs=[upload],
                                label="Sample photos (scikit-image)")
            with gr.Column(scale=3):
                num_masks = gr.Slider(1, segmenter.max_masks, value=params.num_masks, step=1, elem_id="num-masks",
                                      label="K: number of k-means masks (segmentor.num_masks)")
                lam = gr.Slider(0.5, max(50.0, params.lam), value=params.lam, step=0.5, elem_id="lam",
                                label="lambda: modulation strength (segmentor.lam)")
                vocabulary = gr.Textbox(label="Vocabulary (optional): name the masks with CLIP", elem_id="vocabulary",
                                        placeholder="cat, dog, grass   or a shipped one: coco, ade150, pc59, voc",
                                        visible=segmenter.namer is not None)
                button = gr.Button("Segment", variant="primary", elem_id="segment")
        with gr.Row(equal_height=True):
            photo = gr.Image(label="photo", interactive=False, elem_id="panel-photo")
            kmeans = gr.AnnotatedImage(label="k-means masks (feature grid)", color_map=colours, elem_id="panel-kmeans")
            bilinear = gr.AnnotatedImage(label="bilinear upsampling", color_map=colours, elem_id="panel-bilinear")
            emerdiff = gr.AnnotatedImage(label="EmerDiff", color_map=colours, elem_id="panel-emerdiff")
        selected = gr.Markdown(elem_id="selected")
        info = gr.Markdown(elem_id="summary")
        downloads = gr.File(label="Downloads: label PNG (palette = mask colours), npz arrays, COCO JSON (RLE masks)",
                            file_count="multiple", interactive=False, elem_id="downloads")
        rows = gr.State()

        upload.change(page.preview, inputs=upload, outputs=photo, concurrency_limit=4)
        button.click(segment, inputs=[upload, num_masks, lam, vocabulary],
                     outputs=[photo, kmeans, bilinear, emerdiff, info, downloads, rows, selected],
                     concurrency_limit=1, concurrency_id="segment")
        for panel in (kmeans, bilinear, emerdiff):
            panel.select(describe, inputs=rows, outputs=selected)
    return app


def serve(segmenter: DemoSegmenter, host: str = "127.0.0.1", port: Optional[int] = None,
          notice: Optional[str] = None, samples: bool = True, queue_size: int = 32) -> None:
    """Build the page and serve it until interrupted (Ctrl-C or SIGTERM); visitors wait in Gradio's queue (up to
    `queue_size`). The server is closed on the way out."""
    photos = sample_photos(segmenter.workdir / "samples") if samples else []
    app = build_demo(segmenter, photos, notice)
    app.queue(max_size=queue_size)
    in_main_thread = threading.current_thread() is threading.main_thread()  # where signal handlers can be set
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        app.launch(server_name=host, server_port=port, allowed_paths=[str(segmenter.workdir)], show_error=False,
                   max_file_size=MAX_UPLOAD)
    finally:
        app.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(0)  # so that `finally` blocks run (the server closes, the tool removes its files)
