"""The command-line tools, one module per command: `emerdiff-predict` (or `python tools/predict.py`), `emerdiff-eval`,
`emerdiff-ov-eval`, `emerdiff-visualize`, `emerdiff-export`, `emerdiff-benchmark`, `emerdiff-selfcheck`,
`emerdiff-demo` and `emerdiff-sample-images`.

This is the top layer: it wires the core (emerdiff) and the open-vocabulary part (ovseg) to argparse, the
config files and Lightning's Trainer; nothing below imports it. Each module imports only light modules until
its arguments are parsed, so `--help` answers at once.
"""
