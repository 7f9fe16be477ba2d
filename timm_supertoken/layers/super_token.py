"""`SuperTokenClustering`, the parameter-free token sampler of the super-token embedding, as an nn.Module.

The maths lives in `timm_supertoken.functional.super_token` (the reference path, the specification);
this module picks the implementation: CUDA tensors go to the fused Triton kernels of
`timm_supertoken.ops` (same maths, see `backend`), everything else to the reference path.
"""
import importlib.util

import torch
from torch import nn

from timm.layers import register_notrace_module

from ..functional.super_token import (
    FUSED_DTYPES, MAX_FUSED_GRID, check_finite, check_finite_result, check_super_token_input, super_token_clustering)
from .config import BACKENDS, get_backend, get_check_finite

__all__ = ['SuperTokenClustering', 'use_triton']

_TRITON_AVAILABLE = importlib.util.find_spec('triton') is not None  # looked up once, outside torch.compile's trace


@torch.jit.ignore
def is_traced_or_exported(x: torch.Tensor) -> bool:
    """Whether x flows through torch.jit tracing, torch.fx symbolic tracing, torch.export or ONNX export.

    Those record the ops they see, so the layers give them plain, exportable ops: no Triton, nothing in place.
    """
    return isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_exporting() \
        or torch.onnx.is_in_onnx_export()


@torch.jit.ignore
def use_triton(x: torch.Tensor, supported: bool, backend: str = 'auto') -> bool:
    """Whether a layer runs its Triton kernels on x, or its plain PyTorch ops.

    torch.jit tracing, torch.fx symbolic tracing, torch.export and ONNX export always get the plain ops,
    which are exportable. `'auto'` follows the process-wide setting (`timm_supertoken.layers.config`), which
    by default takes Triton for CUDA tensors when it is importable and the layer `supported` x; `'triton'`
    forces it (the ops raise a clear error for a CPU tensor outside Triton's interpreter).
    """
    if is_traced_or_exported(x):
        return False
    if backend == 'auto':
        backend = get_backend()
    if backend == 'reference':
        return False
    if backend == 'triton':
        return True
    return _TRITON_AVAILABLE and x.is_cuda and supported


@torch.jit.ignore
def _use_fused(x: torch.Tensor, grid: int, backend: str) -> bool:
    """The fused super-token op for fp32/fp16/bf16 and grid ≤ 4 (see `use_triton`)."""
    return use_triton(x, x.dtype in FUSED_DTYPES and grid <= MAX_FUSED_GRID, backend)


@torch.jit.ignore
def _scan_for_nonfinite(x: torch.Tensor, fused: bool) -> bool:
    """Whether to check for NaN/Inf: a reduction plus a host sync, free only on the CPU.

    The fused path scans X before launching; the reference path checks its g²-smaller output and reads X
    only to name the cause (`check_finite_result`). On the fused path and on CUDA a sync would stall the GPU
    every step and break CUDA-graph capture (`torch.compile(mode='reduce-overhead')`), so by default only the
    reference path on CPU checks. `timm_supertoken.layers.config.set_check_finite` (or
    $TIMM_SUPERTOKEN_CHECK_FINITE) scans everywhere (for hunting a NaN) or nowhere.
    """
    setting = get_check_finite()
    if setting is not None:
        return setting
    return not fused and x.device.type == 'cpu'


@torch.jit.ignore
def _fused_super_token_clustering(x: torch.Tensor, grid: int, iters: int) -> torch.Tensor:
    # imports Triton: only when the fused path is taken
    from ..ops.super_token_triton import super_token_clustering_triton
    return super_token_clustering_triton(x, grid, iters, validate=False)


@register_notrace_module
class SuperTokenClustering(nn.Module):
    """Parameter-free super-token clustering: (B, C, H, W) -> (B, C, ⌈H/grid⌉, ⌈W/grid⌉).

    Args:
        grid: side of the cell each super token starts from (paper: 2×2 average pooling).
        iters: number of affinity computations t (paper Table 8; t=3 is the paper's choice).
        backend: 'reference' (pure PyTorch, runs everywhere), 'triton' (the fused kernels of
            `timm_supertoken.ops`: CUDA tensors, or CPU ones under TRITON_INTERPRET=1) or 'auto' (the
            default: the process-wide `timm_supertoken.layers.config.get_backend()`, which by default is
            fused for fp32/fp16/bf16 CUDA tensors when Triton is importable and grid ≤ 4). TorchScript,
            tracing, torch.fx, torch.export and ONNX export always use the reference path.

    Shapes, dtypes and settings are checked on every eager call (free). NaN/Inf input is rejected by
    the reference path on CPU; elsewhere see `config.set_check_finite` (`_scan_for_nonfinite`).
    """

    def __init__(self, grid: int = 2, iters: int = 3, backend: str = 'auto') -> None:
        super().__init__()
        if grid < 1:
            raise ValueError(f'super-token grid must be >= 1, got {grid}')
        if iters < 1:
            raise ValueError(f'super-token iterations t must be >= 1, got {iters}')
        if backend not in BACKENDS:
            raise ValueError(f'super-token backend must be one of {BACKENDS}, got {backend!r}')
        self.grid = grid
        self.iters = iters
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            return self._forward_eager(x)
        return super_token_clustering(x, self.grid, self.iters)

    @torch.jit.unused
    def _forward_eager(self, x: torch.Tensor) -> torch.Tensor:
        """Checks and backend choice; TorchScript sees only the reference path."""
        fused = _use_fused(x, self.grid, self.backend)
        checked = not torch.compiler.is_compiling()
        if checked:
            check_super_token_input(x, self.grid, self.iters)
        scan = checked and _scan_for_nonfinite(x, fused)
        if fused:
            if scan:
                check_finite(x)
            return _fused_super_token_clustering(x, self.grid, self.iters)
        tokens = super_token_clustering(x, self.grid, self.iters)
        if scan:
            check_finite_result(x, tokens)  # NaN/Inf input always reaches the output, which is g² smaller
        return tokens

    def extra_repr(self) -> str:
        backend = '' if self.backend == 'auto' else f', backend={self.backend}'
        return f'grid={self.grid}, iters={self.iters}{backend}'
