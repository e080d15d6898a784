"""`python tools/visualize.py ...` is the `emerdiff-visualize` command; its code and options: emerdiff/cli/visualize.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.visualize import main

if __name__ == "__main__":
    raise SystemExit(main())
