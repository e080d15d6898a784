"""Draw figures from a finished run's saved arrays, without segmenting: NAME_figure.png of every image of a
prediction run, or one comparison grid figure.png of an evaluation.

    python tools/visualize.py --output results/ [output.overlay_alpha=0.6]
    python tools/visualize.py --output runs/toyworld --cfg eval/toyworld [--images 4 | --ids ID,ID]

A results folder of tools/predict.py: each figure is one row: photo | low-res k-means masks | bilinear upsampling
| EmerDiff labels, and for a run that named its masks a class panel with a legend of the class names. The run's
own config (DIR/config.yaml) comes first, then --cfg files and overrides, of which only the output.* keys apply:
the masks and names are the saved ones.

A results folder of tools/eval.py: DIR/figure.png has one row per image: image | ground truth | k-means masks
upsampled nearest | bilinear | EmerDiff, masks coloured by the class the per-image Hungarian matching gives them
(black: no class, or ignored), and a legend. The split, its size and the settings are the ones results.json
records, the masks those of DIR/cache; of --cfg files and overrides only data.root (where the split is),
data.image_list and data.reduce_zero_label apply.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import OmegaConf

from emerdiff.cli.common.arguments import base_parser, parse_args
from emerdiff.cli.common.evaluation import evaluation_split
from emerdiff.cli.common.messages import plural, random_model_notice, reported_errors, toy_model_notice
from emerdiff.cli.common.naming import saved_names
from emerdiff.config import ConfigError, load_config
from emerdiff.predict.layout import CONFIG

if TYPE_CHECKING:
    from emerdiff.evaluation import SavedEvaluation

DEFAULT_IMAGES = 4
EVALUATION_KEYS = ("data.root", "data.image_list", "data.reduce_zero_label")  # what applies to an evaluation's figure


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and draw the figures; user errors exit with status 2 and a message."""
    parser = base_parser(
        __doc__.split("\n")[0],
        overrides_help="output.* overrides (the drawing's settings), e.g. output.overlay_alpha=0.6; for an "
        "evaluation's folder, data.root=PATH",
    )
    parser.add_argument(
        "--output", required=True, type=Path, help="results folder of tools/predict.py or of tools/eval.py"
    )
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--images",
        type=int,
        metavar="N",
        help=f"evaluation folder: draw the split's first N evaluated images (default {DEFAULT_IMAGES})",
    )
    chosen.add_argument("--ids", metavar="ID,ID", help="evaluation folder: draw these images, in this order")
    args = parse_args(parser, argv)
    with reported_errors():
        if (args.output / CONFIG).is_file():
            draw_prediction_figures(args)
            return 0
        from emerdiff.evaluation import SavedEvaluation  # torch loads once the arguments are checked

        saved = SavedEvaluation.read(args.output)
        if saved is None:
            raise ConfigError(
                f"'{args.output}' is neither a results folder of tools/predict.py (config.yaml) nor one of "
                "tools/eval.py (results.json and cache/): give --output the folder such a run wrote"
            )
        draw_evaluation_figure(args, saved)
    return 0


def draw_prediction_figures(args: argparse.Namespace) -> None:
    """NAME_figure.png again for every finished image of a prediction run, from its saved arrays."""
    if args.images is not None or args.ids is not None:
        raise ConfigError(
            "--images and --ids choose the images of an evaluation's figure; a prediction run's figures are "
            "drawn for every image"
        )
    other = [o for o in args.overrides if not o.startswith("output.")]
    if other:
        raise ConfigError(
            f"{', '.join(other)}: figures are drawn from the saved masks, so only output.* keys "
            "apply here; to segment with other settings, run tools/predict.py into a new --output"
        )
    cfg = load_config([args.output / CONFIG, *args.cfg], overrides=args.overrides)
    from emerdiff.predict import OutputOptions, OutputStore  # torch loads once the arguments are checked

    store = OutputStore(args.output, OutputOptions.from_config(cfg.output))
    drawn, skipped = store.redraw_finished(saved_names(cfg), endings=["_figure.png"])
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"drew {plural(drawn, 'figure')} (NAME_figure.png) in {args.output}/")


def draw_evaluation_figure(args: argparse.Namespace, saved: SavedEvaluation) -> None:
    """DIR/figure.png of an evaluation's folder: the chosen images, their masks from its cache."""
    other = [o for o in args.overrides if o.split("=", 1)[0] not in EVALUATION_KEYS]
    if other:
        raise ConfigError(
            f"{', '.join(other)}: the figure shows the evaluated masks with the recorded settings, so only "
            f"{', '.join(EVALUATION_KEYS)} apply here"
        )
    if args.images is not None and args.images < 1:
        raise ConfigError(f"--images {args.images}: give at least 1")
    cfg = load_config(args.cfg, overrides=args.overrides)
    if cfg.data.dataset not in (None, saved.dataset):
        raise ConfigError(
            f"'{args.output}' evaluated {saved.dataset}, not {cfg.data.dataset}: give the --cfg of that split "
            f"(e.g. --cfg eval/...) or only data.root=PATH"
        )
    if not cfg.data.root:
        raise ConfigError(
            f"tell where the split {saved.dataset} of '{args.output}' is: data.root=PATH, or the --cfg it was "
            "evaluated with"
        )
    cfg.data.dataset, cfg.data.size, cfg.eval.crop = saved.dataset, saved.size, saved.settings.crop
    from emerdiff.evaluation import FIGURE, StaleCacheError, evaluation_figure, figure_ids
    from emerdiff.files import atomic_file

    metadata, data = evaluation_split(cfg)
    wanted = [i.strip() for i in args.ids.split(",") if i.strip()] if args.ids else []
    try:
        ids = figure_ids(data.image_ids(), saved.cache(), args.images or DEFAULT_IMAGES, wanted)
        picture = evaluation_figure(saved, data, metadata, ids)
    except StaleCacheError as exc:
        raise ConfigError(str(exc)) from None
    model = OmegaConf.create({"model": saved.prediction_settings["model"]})
    for notice in (random_model_notice(model), toy_model_notice(model)):
        if notice:
            print(notice)
    with atomic_file(args.output / FIGURE) as handle:
        picture.save(handle, format="PNG")
    print(f"drew {FIGURE} in {args.output}/: {plural(len(ids), 'image')} ({', '.join(ids)})")


if __name__ == "__main__":
    raise SystemExit(main())
