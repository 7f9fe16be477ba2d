"""Fused GPU kernels (Triton). Importing this package imports Triton; the layers import it only on demand."""
from .aot import KernelFacts, compile_gelu_bn_kernels, compile_kernels, kernel_facts
from .gelu_bn_triton import gelu_batch_norm_triton
from .super_token_triton import DIRECT_LAUNCH, INTERPRET, super_token_clustering_triton

__all__ = [
    'DIRECT_LAUNCH', 'INTERPRET', 'KernelFacts', 'compile_gelu_bn_kernels', 'compile_kernels',
    'gelu_batch_norm_triton', 'kernel_facts', 'super_token_clustering_triton',
]
