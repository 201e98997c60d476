"""Stage two, fusion of cached layers and backbones into features (arrives with the training stage)."""
