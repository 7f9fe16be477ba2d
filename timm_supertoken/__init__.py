"""timm-supertoken: super-token convolutional embeddings for timm's Vision Transformer.

Importing the package registers `vit_{tiny,small,base}_{patch,convembed,stconv}` in timm's model registry
(after `pip install` this also happens by itself when timm is imported). The paper's models are the three
ViT-Small ones; the tiny and base sizes carry the same embeddings at timm's usual widths.
"""
from .layers import (
    ConvStemEmbed,
    PatchLayerNormEmbed,
    SuperTokenClustering,
    SuperTokenConvEmbed,
    super_token_clustering,
)
from .models import MODEL_NAMES, REGISTERED_MODEL_NAMES

__version__ = '0.1.0'
