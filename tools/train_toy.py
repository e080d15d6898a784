"""`python tools/train_toy.py ...` is the `emerdiff-train-toy` command; its code and options: emerdiff/cli/train_toy.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.train_toy import main

if __name__ == "__main__":
    raise SystemExit(main())
