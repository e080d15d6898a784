"""Segment a user's images with EmerDiff: one image file, a folder, a glob or a list file; one CPU or many GPUs.

    python tools/predict.py --cfg configs/emerdiff_sd15.yaml --input photos/ --output results/ [key=value ...]

With ovseg.vocab="cat,dog,grass" (or a shipped vocabulary such as coco, or a .txt file) every mask is also
named with CLIP: NAME_ov.png, NAME_ov_overlay.jpg with a legend, and per-mask classes in the npz and manifest.
Rerunning the same command skips images that are done (--overwrite redoes them). Devices, precision
and strategy come from the `trainer:` section, e.g. trainer.devices=4 trainer.strategy=ddp.
Inputs, outputs and multi-GPU use: docs/usage.md.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from _common import (add_output_arguments, apply_output_arguments, base_parser,  # first: finds the checkout
                     build_segmentor, build_trainer, load_cli_config,
                     output_options, ovseg_settings, parse_args, random_model_notice, reported_errors)
from omegaconf import DictConfig, OmegaConf

from emerdiff import ConfigError
from emerdiff.config import RUN_ONLY_KEYS, OVSegConfig
from emerdiff.inputs import InputImage, PredictImages, find_images
from emerdiff.lightning_module import EmerDiffPredictor, ImagesProgressBar, ResultWriter
from emerdiff.outputs import CONFIG, FAILURES, OutputStore, atomic_file
from ovseg import Vocabulary
from ovseg.pipeline import MaskNamer, build_labeller, text_cache_folder

RESULT_SECTIONS = ("model", "segmentor", "ovseg")


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line and run the prediction; user errors exit with status 2 and a message."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--input", help="image file, folder (recursive), glob pattern or .txt list (data.input)")
    add_output_arguments(parser, "redo images that are done")
    parser.add_argument("--figure", action="store_true", help="also write NAME_figure.png (output.figure=true)")
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        cfg.data.input = args.input or cfg.data.input
        apply_output_arguments(cfg, args)
        cfg.output.figure = args.figure or cfg.output.figure
        return predict(cfg)


def predict(cfg: DictConfig) -> int:
    """Segment every image of `data.input` that is not done yet into `output.dir`."""
    if not cfg.data.input or not cfg.output.dir:
        raise ConfigError("tell where the images are and where results go: --input PATH --output DIR")
    out = Path(cfg.output.dir)
    naming = ovseg_settings(cfg) if cfg.ovseg.vocab else None
    store = OutputStore(out, output_options(cfg))
    done = set() if cfg.output.overwrite else store.done()
    if done:  # only results bind a folder to its settings: a run that failed before any result does not
        check_same_settings(out / CONFIG, cfg)
    images = find_images(cfg.data.input, exclude=out)
    pending = [image for image in images if image.name not in done]
    callbacks = [ResultWriter(store)]
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(ImagesProgressBar())
    trainer = build_trainer(cfg.trainer, callbacks=callbacks, logger=False, enable_checkpointing=False,
                            use_distributed_sampler=False, default_root_dir=str(out))
    if trainer.is_global_zero:
        announce(cfg, images, pending)
        with atomic_file(out / CONFIG) as handle:
            handle.write(OmegaConf.to_yaml(cfg).encode())
    if not pending:
        return 0
    module = EmerDiffPredictor(build_segmentor(cfg, trainer), build_namer(naming, out))
    start = time.perf_counter()  # after loading the models: the summary's images/s is the segmentation rate
    trainer.predict(module, datamodule=PredictImages(pending, cfg.data.num_workers), return_predictions=False)
    if trainer.is_global_zero:
        print(summary(store, pending, len(images) - len(pending), time.perf_counter() - start))
    return 0


def build_namer(naming: Optional[Tuple[OVSegConfig, Vocabulary]], out: Path) -> Optional[MaskNamer]:
    """With ovseg.vocab, the CLIP labeller that names every mask; text embeddings cached under the output."""
    if naming is None:
        return None
    settings, vocab = naming
    return MaskNamer(build_labeller(settings, vocab, text_cache_folder(settings, out)), vocab.names)


def check_same_settings(saved: Path, cfg: DictConfig) -> None:
    """Refuse to add results made with other model or segmentor settings to an existing results folder."""
    if not saved.is_file():
        return
    before, now = _flat(OmegaConf.load(saved), *RESULT_SECTIONS), _flat(cfg, *RESULT_SECTIONS)
    changed = [f"{k}: {before.get(k)} -> {now.get(k)}" for k in sorted(before.keys() | now.keys())
               if k not in RUN_ONLY_KEYS and before.get(k) != now.get(k)]
    if changed:
        raise ConfigError(f"'{saved.parent}' holds results made with other settings ({'; '.join(changed)}); "
                          "choose another --output, or pass --overwrite to redo every image")


def _flat(cfg: DictConfig, *sections: str) -> Dict[str, object]:
    return {f"{s}.{k}": v for s in sections if s in cfg
            for k, v in OmegaConf.to_container(cfg[s], resolve=True).items()}


def announce(cfg: DictConfig, images: List[InputImage], pending: List[InputImage]) -> None:
    """What the run will do, before it starts."""
    notice = random_model_notice(cfg)
    if notice:
        print(notice)
    done = len(images) - len(pending)
    print(f"{len(images)} images in {cfg.data.input}: {done} already done in {cfg.output.dir}, {len(pending)} to segment"
          + (" (--overwrite redoes all)" if done else ""))


def summary(store: OutputStore, pending: List[InputImage], skipped: int, seconds: float) -> str:
    """One line: images segmented, failures, images skipped as done, time, where the results are."""
    manifest, failures = store.manifest(), store.failures()
    segmented = sum(image.name in manifest for image in pending)
    failed = f"{len(failures)} failed (listed in {store.root / FAILURES})" if failures else "0 failed"
    return (f"done: {segmented} segmented, {failed}, {skipped} already done before; "
            f"{seconds:.1f} s ({segmented / seconds:.2f} images/s). Results in {store.root}/")


if __name__ == "__main__":
    raise SystemExit(main())
