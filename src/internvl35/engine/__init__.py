"""Serving engine: paged KV cache, block manager with multimodal prefix caching, scheduler."""
