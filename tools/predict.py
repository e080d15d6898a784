"""`python tools/predict.py ...` is the `emerdiff-predict` command; its code and options: emerdiff/cli/predict.py."""

import _checkout  # noqa: F401  (a checkout runs without installing)
from emerdiff.cli.predict import main

if __name__ == "__main__":
    raise SystemExit(main())
