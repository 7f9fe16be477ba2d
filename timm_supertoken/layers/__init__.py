from .embeds import ConvActNorm, ConvStemEmbed, PatchLayerNormEmbed, Patchify, SuperTokenConvEmbed, TokenEmbed
from .super_token import (
    SuperTokenClustering,
    check_super_token_input,
    super_token_affinities,
    super_token_aggregate,
    super_token_clustering,
)
