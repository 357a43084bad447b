"""internvl35: the InternVL3.5 model family in plain PyTorch.

    model = internvl35.load("mini")            # or a checkpoint directory (custom or -HF format)
    model.chat("What color is the circle?", images=["shapes.png"])
"""

from internvl35.chat import ChatModel, load
from internvl35.config import CONFIGS, ModelConfig, get_config
from internvl35.data.image import dynamic_preprocess
from internvl35.sampling import SamplingParams

__all__ = ["load", "ChatModel", "get_config", "CONFIGS", "ModelConfig", "dynamic_preprocess", "SamplingParams"]
__version__ = "0.1.0"
