"""Serving: the OpenAI-compatible server over the engine (and, later, decoupled vision/language)."""
