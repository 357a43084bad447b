"""`python -m internvl35.train CONFIG.yaml` (the entry point torchrun uses)."""

import sys

from internvl35.train.config import load_config
from internvl35.train.loop import train

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m internvl35.train CONFIG.yaml")
    train(load_config(sys.argv[1]))
