"""Draw NAME_figure.png for every image of a finished prediction run, without segmenting again.

    python tools/visualize.py --output results/ [--cfg more.yaml] [output.overlay_alpha=0.6]

Each figure is one row: photo | low-res k-means masks | bilinear upsampling | EmerDiff labels.
The run's own config (DIR/config.yaml) comes first, then --cfg files and overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

from _common import base_parser, parse_args, reported_errors  # first: finds the checkout
import numpy as np

from emerdiff import ConfigError, ImageLoadError, load_config
from emerdiff.image import read_image
from emerdiff.predict import CONFIG, OutputOptions, OutputStore


def main(argv: Optional[List[str]] = None) -> int:
    """Parse the command line and draw the figures; user errors exit with status 2 and a message."""
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="results folder of tools/predict.py")
    args = parse_args(parser, argv)
    with reported_errors():
        saved = args.output / CONFIG
        if not saved.is_file():
            raise ConfigError(f"'{args.output}' is not a results folder of tools/predict.py (no config.yaml)")
        args.cfg = [saved, *args.cfg]
        cfg = load_config(args.cfg, overrides=args.overrides)
        store = OutputStore(args.output, OutputOptions.from_config(cfg.output))
        drawn = draw_figures(store)
        print(f"drew {drawn} figures (NAME_figure.png) in {args.output}/")
    return 0


def draw_figures(store: OutputStore) -> int:
    """A figure for every image in the manifest whose photo can still be read; returns how many."""
    drawn = 0
    for name, record in store.manifest().items():
        try:
            photo = read_image(record["path"])
        except (ImageLoadError, FileNotFoundError) as exc:
            print(f"skipped {name}: {exc}")
            continue
        with np.load(store.root / f"{name}.npz") as arrays:
            store.write_figure(name, photo, arrays)
        drawn += 1
    return drawn


if __name__ == "__main__":
    raise SystemExit(main())
