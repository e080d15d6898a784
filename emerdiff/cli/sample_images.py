"""Write scikit-image's sample photos into a folder (some in subfolders), to try the tools on real images.

python tools/sample_images.py outputs/photos
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from skimage import data

from emerdiff.cli.common.arguments import command_parser

SAMPLES = {
    "astronaut.png": data.astronaut,
    "coffee.jpg": data.coffee,
    "animals/chelsea.jpg": data.chelsea,
    "objects/rocket.jpg": data.rocket,
}


def write_samples(folder: Path) -> list[Path]:
    """Save every sample photo under `folder`; returns the files written."""
    written = []
    for name, load in SAMPLES.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(load()).save(path, quality=95)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Parse the folder argument and write the photos."""
    parser = command_parser(__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="where the photos go (created if missing)")
    folder = parser.parse_args(argv).folder
    print(f"wrote {len(write_samples(folder))} photos to {folder}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
