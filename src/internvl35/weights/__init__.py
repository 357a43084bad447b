"""Checkpoints: config.json formats, the key map between formats, streaming load and export."""
