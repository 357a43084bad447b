"""The mini world: procedurally generated, verifiable vision-language tasks (Pillow only)."""

from internvl35.data.world.render import Style
from internvl35.data.world.sample import Sample, is_correct
from internvl35.data.world.tasks import EVAL_FAMILIES, FAMILIES, generate

__all__ = ["EVAL_FAMILIES", "FAMILIES", "Sample", "Style", "generate", "is_correct"]
