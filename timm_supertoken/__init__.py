"""timm-supertoken: super-token convolutional embeddings for timm's Vision Transformer.

Importing the package registers `vit_small_patch`, `vit_small_convembed` and `vit_small_stconv` in
timm's model registry (after `pip install` this also happens by itself when timm is imported).
"""
from .layers import (
    ConvStemEmbed,
    PatchLayerNormEmbed,
    SuperTokenClustering,
    SuperTokenConvEmbed,
    super_token_clustering,
)
from .models import default_cfgs

__version__ = '0.1.0'

MODEL_NAMES = tuple(default_cfgs)
