"""Training: one loop for pre-training and SFT (and later MPO, GSPO, ViCO), configs from YAML."""
