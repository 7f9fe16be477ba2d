"""The operators' maths as plain functions: the specification that the layers and the fused ops share."""
from .super_token import (
    FUSED_DTYPES,
    MAX_FUSED_GRID,
    check_finite,
    check_finite_result,
    check_super_token_input,
    super_token_affinities,
    super_token_aggregate,
    super_token_clustering,
)

__all__ = [
    'FUSED_DTYPES', 'MAX_FUSED_GRID', 'check_finite', 'check_finite_result', 'check_super_token_input',
    'super_token_affinities', 'super_token_aggregate', 'super_token_clustering',
]
