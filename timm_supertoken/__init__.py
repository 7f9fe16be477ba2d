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
from .models import default_cfgs

__version__ = '0.1.0'

REGISTERED_MODEL_NAMES = tuple(default_cfgs)  # every size: what export, push and load accept
# the paper's three ViT-S models: what compare, info and the benchmarks run by default
MODEL_NAMES = tuple(name for name in REGISTERED_MODEL_NAMES if name.startswith('vit_small_'))
