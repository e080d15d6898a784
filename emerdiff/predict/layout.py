"""File names of a prediction results folder (the layout: `emerdiff.predict.outputs`); light to import."""

PARTS_DIR = ".parts"  # each rank's records while a run is going
MANIFEST = "manifest.jsonl"
FAILURES = "failures.jsonl"
CONFIG = "config.yaml"  # the resolved configuration of the run that wrote the folder
