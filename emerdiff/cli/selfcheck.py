"""Check a first run on your GPU and weights: invariants that hold for any weights, in your dtype, with timings.

    python tools/selfcheck.py --cfg configs/emerdiff_sd15.yaml [--image PHOTO] --output DIR [key=value ...]

Writes DIR/selfcheck.json and DIR/selfcheck.md (environment, every check with its figure, threshold and
pass / fail / skipped, seconds per stage, images/s). Exits 0 when no check fails, 1 when one does (the
message says which and what to put in a bug report), 2 on a user error (config, weights, image).
The checks: emerdiff/selfcheck.py; thresholds: docs/benchmarks.md ("Self-check").
"""

from __future__ import annotations

import sys
from pathlib import Path

from emerdiff.cli.common.arguments import base_parser, load_cli_config, parse_args
from emerdiff.cli.common.messages import reported_errors
from emerdiff.config import preset_settings


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(__doc__.split("\n")[0])
    parser.add_argument("--image", help="photo to check with (default: scikit-image's astronaut)")
    parser.add_argument("--output", required=True, help="folder for selfcheck.json and selfcheck.md")
    parser.add_argument(
        "--small-k",
        type=int,
        default=None,
        help="masks of the fast-vs-reference, lambda = 0 and injection checks (default: emerdiff.selfcheck.SMALL_K)",
    )
    parser.add_argument(
        "--preset",
        default="fast",
        help="approximate preset compared with the exact path on the image: a shipped config or YAML "
        "file whose segmentor section holds the approximations (default: fast); none to skip",
    )
    args = parse_args(parser, argv)
    with reported_errors():
        cfg = load_cli_config(args)
        preset = None if args.preset == "none" else preset_settings(args.preset)
        from emerdiff import EmerDiff
        from emerdiff.selfcheck import run_selfcheck
        from emerdiff.selfcheck_report import summary, write_report

        model = EmerDiff.from_config(cfg)
        report = run_selfcheck(
            model,
            args.image,
            args.small_k,
            log=lambda m: print(f"selfcheck: {m}", flush=True),
            preset=preset,
            preset_name=args.preset,
        )
    output = Path(args.output)
    write_report(report, output)
    print(summary(report, output))
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
