"""`python tools/eval.py ...` is the `emerdiff-eval` command; its code and options: emerdiff/cli/eval.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.eval import main

if __name__ == "__main__":
    raise SystemExit(main())
