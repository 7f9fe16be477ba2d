"""Fused GPU kernels (Triton). Importing this package imports Triton; the layers import it only on demand."""
from .super_token_triton import FUSED_DTYPES, INTERPRET, MAX_FUSED_GRID, super_token_clustering_triton

__all__ = ['FUSED_DTYPES', 'INTERPRET', 'MAX_FUSED_GRID', 'super_token_clustering_triton']
