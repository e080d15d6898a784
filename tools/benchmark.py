"""`python tools/benchmark.py ...` is the `emerdiff-benchmark` command; its code and options: emerdiff/cli/benchmark.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
