"""Fused GPU kernels (Triton). Importing this package imports Triton; the layers import it only on demand."""
from .aot import KernelFacts, TargetKernel, compile_kernels, kernel_facts
from .super_token_triton import DIRECT_LAUNCH, INTERPRET, super_token_clustering_triton

__all__ = [
    'DIRECT_LAUNCH', 'INTERPRET', 'KernelFacts', 'TargetKernel', 'compile_kernels', 'kernel_facts',
    'super_token_clustering_triton',
]
