"""Segment a user's images with EmerDiff: one image file, a folder, a glob or a list file; one CPU or many GPUs.

    python tools/predict.py --cfg configs/emerdiff_sd15.yaml --input photos/ --output results/ [key=value ...]

With ovseg.vocab="cat,dog,grass" (or a shipped vocabulary such as coco, or a .txt file) every mask is also
named with CLIP: NAME_ov.png, NAME_ov_overlay.jpg with a legend, and per-mask classes in the npz and manifest.
Rerunning the same command skips images that are done (--overwrite redoes them). Devices, precision
and strategy come from the `trainer:` section, e.g. trainer.devices=4 trainer.strategy=ddp.
Inputs, outputs and multi-GPU use: docs/usage.md.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from emerdiff.cli.common.arguments import (
    add_output_arguments,
    apply_output_arguments,
    base_parser,
    load_cli_config,
    output_lock,
    parse_args,
)
from emerdiff.cli.common.messages import plural, random_model_notice, reported_errors
from emerdiff.cli.common.naming import naming_settings, saved_names, vocabulary_of
from emerdiff.cli.common.trainer import build_segmentor, build_trainer, progress_bar
from emerdiff.config import ConfigError, load_config, result_settings
from emerdiff.files import atomic_file
from emerdiff.predict.export import FORMATS, export
from emerdiff.predict.layout import CONFIG, FAILURES

if TYPE_CHECKING:  # torch and Lightning load once the arguments are parsed, so --help answers at once
    import pytorch_lightning as pl

    from emerdiff.predict import ExtrasStep, OutputStore, SourceImage
    from ovseg.config import OVSegConfig
    from ovseg.vocab import Vocabulary


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and run the prediction; user errors exit with status 2 and a message."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--input", help="image file, folder (recursive), glob pattern or .txt list (data.input)")
    add_output_arguments(parser, "redo images that are done")
    parser.add_argument("--figure", action="store_true", help="also write NAME_figure.png (output.figure=true)")
    parser.add_argument(
        "--export",
        action="append",
        choices=FORMATS,
        default=[],
        metavar="{coco,masks}",
        help="also write DIR/coco.json (coco) or DIR/NAME_masks/NN.png (masks) of every done image; "
        "repeatable (tools/export.py does the same for a finished folder)",
    )
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        cfg.data.input = args.input or cfg.data.input
        apply_output_arguments(cfg, args)
        cfg.output.figure = args.figure or cfg.output.figure
        return predict(cfg, args.export)


def predict(cfg: DictConfig, exports: Sequence[str] = ()) -> int:
    """Segment every image of `data.input` that is not done yet into `output.dir`, then write the `exports`.

    The run holds the output folder's lock (`output_lock`): a second run into it waits, then skips what this one did.
    """
    from emerdiff.predict import OutputOptions, OutputStore, PredictionWriter
    from emerdiff.stopping import StopOnSignal

    if not cfg.data.input or not cfg.output.dir:
        raise ConfigError("tell where the images are and where results go: --input PATH --output DIR")
    out = Path(cfg.output.dir)
    naming = naming_settings(cfg) if cfg.ovseg.vocab else None  # checked before anything loads or is written
    store = OutputStore(out, OutputOptions.from_config(cfg.output, extra_files=named_files() if naming else ()))
    callbacks = [PredictionWriter(store, cfg.output.max_repeated_failures), StopOnSignal(), *progress_bar(cfg.trainer)]
    trainer = build_trainer(
        cfg.trainer,
        callbacks=callbacks,
        enable_checkpointing=False,
        use_distributed_sampler=True,
        default_root_dir=str(out),
    )
    with output_lock(out, trainer.is_global_zero):
        return segment_pending(cfg, store, naming, trainer, exports)


def segment_pending(
    cfg: DictConfig,
    store: OutputStore,
    naming: tuple[OVSegConfig, Vocabulary] | None,
    trainer: pl.Trainer,
    exports: Sequence[str],
) -> int:
    """The run once it holds the output folder: what is done there decides what is left to segment."""
    from emerdiff.predict import EmerDiffPredictor, PredictImages, find_images
    from emerdiff.stopping import EXIT_SOME_FAILED, RunStopped

    out = store.root
    if not cfg.output.overwrite and store.manifest():  # results bind a folder to its settings; a failed start does not
        check_same_settings(out / CONFIG, cfg)
        redraw_missing(store, cfg)
    done = set() if cfg.output.overwrite else store.done()
    images = find_images(cfg.data.input, exclude=out)
    pending = [image for image in images if image.name not in done]
    if trainer.is_global_zero:
        announce(cfg, images, pending)
    status = 0
    if pending:
        module = EmerDiffPredictor(build_segmentor(cfg, trainer), build_namer(naming, out))
        if trainer.is_global_zero:  # once the models loaded: a run that could not start leaves no config behind
            with atomic_file(out / CONFIG) as handle:
                handle.write(OmegaConf.to_yaml(cfg).encode())
        start = time.perf_counter()  # after loading the models: the summary's images/s is the segmentation rate
        try:
            trainer.predict(module, datamodule=PredictImages(pending, cfg.data.num_workers), return_predictions=False)
        except RunStopped as stop:  # finished images are saved and merged; a rerun continues with the rest
            print(
                f"{stop}: {len(store.manifest())} of {plural(len(images), 'image')} done; rerun the same command "
                "to continue",
                file=sys.stderr,
            )
            return stop.exit_code
        if trainer.is_global_zero:
            print(summary(store, pending, len(images) - len(pending), time.perf_counter() - start))
        status = EXIT_SOME_FAILED if store.failures() else 0
    if exports and trainer.is_global_zero:  # after every rank's results are merged into the manifest
        export(out, exports)
        print(f"exported {', '.join(exports)} of every done image to {out}/")
    return status


def named_files() -> tuple:
    """The files a run that names masks adds per image (ovseg, imported only for such a run)."""
    from ovseg.outputs import NAMED_FILES

    return NAMED_FILES


def redraw_missing(store: OutputStore, cfg: DictConfig) -> None:
    """Draw the pictures finished images lack (e.g. --figure after the run) from their npz, without the model."""
    drawn, _ = store.redraw_finished(saved_names(cfg))  # an unreadable photo: segmented again, and fails there
    if drawn:
        print(f"drew the missing pictures of {plural(drawn, 'finished image')} from their saved arrays")


def build_namer(naming: tuple[OVSegConfig, Vocabulary] | None, out: Path) -> ExtrasStep | None:
    """With ovseg.vocab, the CLIP labeller that names every mask; text embeddings cached under the output."""
    if naming is None:
        return None
    from ovseg.outputs import mask_namer  # loads open_clip: only for runs that name masks

    return mask_namer(*naming, out)


def check_same_settings(saved: Path, cfg: DictConfig) -> None:
    """Refuse to add results made with other model, segmentor or naming settings to an existing results folder."""
    if not saved.is_file():
        return
    before_cfg = load_config(saved)
    named = bool(vocabulary_of(before_cfg)) and bool(vocabulary_of(cfg))  # else only the vocabulary can differ
    before, now = result_values(before_cfg, named), result_values(cfg, named)
    changed = [
        f"{k}: {before.get(k)} -> {now.get(k)}"
        for k in sorted(before.keys() | now.keys())
        if before.get(k) != now.get(k)
    ]
    if changed:
        raise ConfigError(
            f"'{saved.parent}' holds results made with other settings ({'; '.join(changed)}); "
            "choose another --output, or pass --overwrite to redo every image"
        )


def result_values(cfg: DictConfig, named: bool) -> dict[str, object]:
    """``section.key -> value`` of the settings results depend on; all of the ovseg section only if `named`."""
    values = {
        f"{section}.{k}": v
        for section in ("model", "segmentor")
        for k, v in result_settings(OmegaConf.to_object(cfg[section])).items()
    }
    if not named:
        return values | {"ovseg.vocab": vocabulary_of(cfg)}
    from ovseg.config import ovseg_settings  # masks are named: ovseg is in use

    return values | {f"ovseg.{k}": v for k, v in result_settings(ovseg_settings(cfg)).items()}


def announce(cfg: DictConfig, images: list[SourceImage], pending: list[SourceImage]) -> None:
    """What the run will do, before it starts."""
    notice = random_model_notice(cfg)
    if notice:
        print(notice)
    done = len(images) - len(pending)
    print(
        f"{plural(len(images), 'image')} in {cfg.data.input}: {done} already done in {cfg.output.dir}, "
        f"{len(pending)} to segment" + (" (--overwrite redoes all)" if done else "")
    )


def summary(store: OutputStore, pending: list[SourceImage], skipped: int, seconds: float) -> str:
    """One line: images segmented, failures, images skipped as done, time, where the results are."""
    manifest, failures = store.manifest(), store.failures()
    segmented = sum(image.name in manifest for image in pending)
    failed = f"{len(failures)} failed (listed in {store.root / FAILURES})" if failures else "0 failed"
    return (
        f"done: {segmented} segmented, {failed}, {skipped} already done before; "
        f"{seconds:.1f} s ({segmented / seconds:.2f} images/s). Results in {store.root}/"
    )


if __name__ == "__main__":
    raise SystemExit(main())
