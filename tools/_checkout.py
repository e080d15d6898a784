"""Lets `python tools/NAME.py` run from a checkout that is not installed: the repository goes first on the path."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
