"""Evaluation: held-out mini-world suites scored by each family's checker."""
