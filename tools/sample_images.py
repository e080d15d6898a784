"""`python tools/sample_images.py ...` is the `emerdiff-sample-images` command; its code and options: emerdiff/cli/sample_images.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.sample_images import main

if __name__ == "__main__":
    raise SystemExit(main())
