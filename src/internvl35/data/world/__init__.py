"""The mini world: procedurally generated, verifiable vision-language tasks (Pillow only)."""

from internvl35.data.world.render import Style
from internvl35.data.world.sample import Sample, is_correct
from internvl35.data.world.tasks import FAMILIES, generate

__all__ = ["FAMILIES", "Sample", "Style", "generate", "is_correct"]
