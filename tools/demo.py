"""`python tools/demo.py ...` is the `emerdiff-demo` command; its code and options: emerdiff/cli/demo.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
