"""Export a finished results folder of tools/predict.py for labelling tools: COCO JSON with RLE masks, mask PNGs.

    python tools/export.py results/ --format coco [--format masks]

coco: results/coco.json (images, one annotation per mask, categories from the vocabulary of a run that
named its masks, else "mask N"); masks: results/NAME_masks/NN.png, one binary PNG per mask.
Formats: docs/usage.md#exports.
"""

from __future__ import annotations

from pathlib import Path

from emerdiff.cli.common.arguments import command_parser
from emerdiff.cli.common.messages import reported_errors
from emerdiff.predict.export import FORMATS, export


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and write the exports; a folder that is not a results folder exits with status 2."""
    parser = command_parser(__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="results folder of tools/predict.py")
    parser.add_argument(
        "--format",
        action="append",
        choices=FORMATS,
        required=True,
        dest="formats",
        help="what to write; give it several times for several formats",
    )
    args = parser.parse_args(argv)
    with reported_errors():
        written = export(args.folder, args.formats)
    print(f"wrote {', '.join(args.formats)} export of {args.folder}/ ({len(written)} files or folders)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
