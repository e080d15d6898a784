"""Draw NAME_figure.png for every image of a finished prediction run from its saved arrays, without segmenting.

    python tools/visualize.py --output results/ [output.overlay_alpha=0.6]

Each figure is one row: photo | low-res k-means masks | bilinear upsampling | EmerDiff labels, and for a
run that named its masks a class panel with a legend of the class names. The run's own config
(DIR/config.yaml) comes first, then --cfg files and overrides, of which only the output.* keys apply:
the masks and names are the saved ones.
"""

from __future__ import annotations

from pathlib import Path

from emerdiff.cli.common.arguments import base_parser, parse_args
from emerdiff.cli.common.messages import plural, reported_errors
from emerdiff.cli.common.naming import saved_names
from emerdiff.config import ConfigError, load_config
from emerdiff.predict.layout import CONFIG


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and draw the figures; user errors exit with status 2 and a message."""
    parser = base_parser(
        __doc__.split("\n")[0],
        overrides_help="output.* overrides (the drawing's settings), e.g. output.overlay_alpha=0.6",
    )
    parser.add_argument("--output", required=True, type=Path, help="results folder of tools/predict.py")
    args = parse_args(parser, argv)
    with reported_errors():
        saved = args.output / CONFIG
        if not saved.is_file():
            raise ConfigError(f"'{args.output}' is not a results folder of tools/predict.py (no config.yaml)")
        other = [o for o in args.overrides if not o.startswith("output.")]
        if other:
            raise ConfigError(
                f"{', '.join(other)}: figures are drawn from the saved masks, so only output.* keys "
                "apply here; to segment with other settings, run tools/predict.py into a new --output"
            )
        cfg = load_config([saved, *args.cfg], overrides=args.overrides)
        from emerdiff.predict import OutputOptions, OutputStore  # torch loads once the arguments are checked

        store = OutputStore(args.output, OutputOptions.from_config(cfg.output))
        drawn, skipped = store.redraw_finished(saved_names(cfg), endings=["_figure.png"])
        for name, why in skipped.items():
            print(f"skipped {name}: {why}")
        print(f"drew {plural(drawn, 'figure')} (NAME_figure.png) in {args.output}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
