"""The toy world's miniature models: their training (emerdiff-train-toy) and shipped weights (docs/toyworld.md)."""
