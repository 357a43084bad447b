"""Inputs: image tiling, video frames, chat templates and token accounting, the tokenizer."""
