"""`python tools/ov_eval.py ...` is the `emerdiff-ov-eval` command; its code and options: emerdiff/cli/ov_eval.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.ov_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
