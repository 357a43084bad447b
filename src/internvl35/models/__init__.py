"""Pure nn.Modules: InternViT, Qwen3 (dense + MoE), projectors, the Flash router, and InternVL itself."""

from internvl35.models.internvl import InternVLModel

__all__ = ["InternVLModel"]
