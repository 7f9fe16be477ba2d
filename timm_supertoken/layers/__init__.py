from .config import (
    BACKENDS, get_backend, get_check_finite, is_autotune_enabled, set_autotune, set_backend, set_check_finite,
    use_autotune, use_backend, use_check_finite)
from .embeds import (ConvActNorm, ConvStemEmbed, PatchEmbedArgs, PatchLayerNormEmbed, Patchify, SuperTokenConvEmbed,
                     TokenEmbed)
from .super_token import SuperTokenClustering
# the operator's functions, defined in timm_supertoken.functional, kept importable from here
from ..functional.super_token import (
    check_super_token_input, super_token_affinities, super_token_aggregate, super_token_clustering)
