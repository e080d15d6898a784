"""`python tools/export.py ...` is the `emerdiff-export` command; its code and options: emerdiff/cli/export.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
