"""`python tools/selfcheck.py ...` is the `emerdiff-selfcheck` command; its code and options: emerdiff/cli/selfcheck.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.selfcheck import main

if __name__ == "__main__":
    raise SystemExit(main())
