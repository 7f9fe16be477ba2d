"""Super-token clustering (paper 000, eqs. 2-4; DESIGN.md §2), the parameter-free token sampler.

The pure-PyTorch reference path below is the specification of the operator: it is vectorised over
cells, pixels and the batch, and uses only pad / reshape / einsum / softmax, so it runs everywhere
(CPU, CUDA, the meta device, TorchScript, torch.fx, ONNX export). `SuperTokenClustering` dispatches
CUDA tensors to the fused Triton kernels of `timm_supertoken.ops` (same maths, see `backend`).
"""
import importlib.util
import os
from typing import List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from timm.layers import register_notrace_function, register_notrace_module

__all__ = [
    'SuperTokenClustering', 'super_token_clustering', 'super_token_affinities', 'super_token_aggregate',
    'check_super_token_input',
]

def _neighbourhood(s: torch.Tensor) -> torch.Tensor:
    """Gather the 3×3 neighbour super tokens of every cell: (B, h, w, C) -> (B, h, w, 9, C), zeros off-grid."""
    h, w = s.shape[1], s.shape[2]
    padded = F.pad(s, (0, 0, 1, 1, 1, 1))
    views: List[torch.Tensor] = []
    for dy in range(3):
        for dx in range(3):
            views.append(padded[:, dy:dy + h, dx:dx + w])
    return torch.stack(views, dim=3)


def _scatter_neighbourhood(c: torch.Tensor) -> torch.Tensor:
    """Adjoint of `_neighbourhood`: sum what every cell sent to its 9 neighbours, (B, h, w, 9, C) -> (B, h, w, C)."""
    B, h, w, _, C = c.shape
    if not torch.jit.is_scripting() and torch.compiler.is_compiling():
        # traced in-place slice adds become chained slice_scatters that take inductor minutes to compile
        padded = F.pad(c, (0, 0, 0, 0, 1, 1, 1, 1))  # (B, h + 2, w + 2, 9, C)
        total = padded[:, 2:2 + h, 2:2 + w, 0]
        for k in range(1, 9):
            dy, dx = k // 3, k % 3
            total = total + padded[:, 2 - dy:2 - dy + h, 2 - dx:2 - dx + w, k]
        return total
    # eager: accumulate in place into one padded buffer, 2-3x faster than allocating shifted copies
    total = c.new_zeros(B, h + 2, w + 2, C)
    for dy in range(3):
        for dx in range(3):
            total[:, dy:dy + h, dx:dx + w] += c[:, :, :, dy * 3 + dx]
    return total[:, 1:h + 1, 1:w + 1]


def _to_cells(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Zero-pad to a multiple of the grid and group pixels by cell: (B, C, H, W) -> (B, h, w, grid², C)."""
    B, C, H, W = x.shape
    h, w = (H + grid - 1) // grid, (W + grid - 1) // grid
    x = F.pad(x, (0, w * grid - W, 0, h * grid - H))
    x = x.reshape(B, C, h, grid, w, grid).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, h, w, grid * grid, C)


def _affinity(
        pixels: torch.Tensor,
        tokens: torch.Tensor,
        real: torch.Tensor,
        on_grid: torch.Tensor,
        scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eq. 2-3: masked softmax over the 9 neighbour super tokens, and its per-token sum Z_j = Σ_p A_pj."""
    logits = torch.einsum('bhwpc,bhwkc->bhwpk', pixels, _neighbourhood(tokens)) * scale
    logits = logits.masked_fill(~on_grid.unsqueeze(3), float('-inf'))
    affinity = logits.softmax(-1) * real.unsqueeze(-1)  # (B, h, w, P, 9), padded pixels weigh nothing
    # every cell owns a real pixel, so Z_j > 0; the ε of STViT only guards the division
    norm = _scatter_neighbourhood(affinity.sum(3).unsqueeze(-1)) + 1e-12  # (B, h, w, 1)
    return affinity, norm


def _aggregate(affinity: torch.Tensor, pixels: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Eq. 4: s_j = Σ_p A_pj x_p / Z_j over the pixels of the 3×3 cells around j, -> (B, h, w, C)."""
    return _scatter_neighbourhood(torch.einsum('bhwpk,bhwpc->bhwkc', affinity, pixels)) / norm


@torch.jit.ignore
def check_super_token_input(x: torch.Tensor, grid: int, iters: int) -> None:
    """Reject inputs the operator would silently turn into garbage, naming the problem."""
    if grid < 1:
        raise ValueError(f'super-token grid must be >= 1, got {grid}')
    if iters < 1:
        raise ValueError(f'super-token iterations t must be >= 1, got {iters}')
    if not isinstance(x, torch.Tensor) or x.ndim != 4:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f'super-token clustering expects a (B, C, H, W) feature map, got {shape}')
    if not x.is_floating_point():
        raise TypeError(f'super-token clustering expects a floating-point feature map, got {x.dtype}')
    if min(x.shape) == 0:
        raise ValueError(f'super-token clustering got an empty feature map of shape {tuple(x.shape)}')
    if not x.is_meta and not bool(torch.isfinite(x).all()):
        raise ValueError('super-token clustering input contains NaN or Inf values')


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are clustered in float32 (the fused kernel accumulates in fp32 too)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def super_token_affinities(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the `iters` clustering iterations of eq. 2-4 and return the last affinities and their sums.

    Returns A of shape (B, h, w, grid², 9), the softmax weights of every pixel of cell (i, j) to its
    3×3 neighbour super tokens (zero for padded pixels and off-grid neighbours), and Z of shape
    (B, h, w, 1), Z_j = Σ_p A_pj + ε. No gradient flows through either (STViT's rule).
    """
    x = x.detach()
    C = x.shape[1]
    pixels = _to_cells(x.to(_compute_dtype(x)), grid)  # (B, h, w, P, C), P = grid²
    real = _to_cells(torch.ones_like(pixels[:1, 0, 0, 0, :1]).expand(1, 1, x.shape[2], x.shape[3]), grid)[..., 0]
    on_grid = _neighbourhood(torch.ones_like(real[..., :1]))[..., 0] > 0  # (1, h, w, 9) neighbour exists
    scale = C ** -0.5

    tokens = pixels.sum(3) / real.sum(3).unsqueeze(-1)  # S⁰: mean of each cell's real pixels
    for _ in range(iters - 1):
        affinity, norm = _affinity(pixels, tokens, real, on_grid, scale)
        tokens = _aggregate(affinity, pixels, norm)
    return _affinity(pixels, tokens, real, on_grid, scale)


def super_token_aggregate(x: torch.Tensor, affinity: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    """The differentiable last aggregation S_j = Σ_p A_pj x_p / Z_j, (B, C, H, W) -> (B, C, h, w)."""
    tokens = _aggregate(affinity, _to_cells(x.to(affinity.dtype), grid), norm)
    return tokens.permute(0, 3, 1, 2).to(x.dtype)


@register_notrace_function
def super_token_clustering(x: torch.Tensor, grid: int = 2, iters: int = 3) -> torch.Tensor:
    """Cluster a (B, C, H, W) map into (B, C, ⌈H/grid⌉, ⌈W/grid⌉) super tokens (reference path).

    S⁰ is the mean of each grid×grid cell's real pixels. Each of the `iters` iterations computes, for
    every pixel p, the affinities to the 9 super tokens around its cell,
    A_pj = softmax_j(⟨x_p, s_j⟩ / √C) (neighbours off the grid masked out, paper eq. 2-3), and
    aggregates s_j = Σ_p A_pj x_p / Σ_p A_pj (eq. 4). Padded pixels take part in no mean, softmax or
    sum. As in STViT (CVPR 2023) only the last aggregation carries gradient, with A and Σ_p A_pj held
    constant, so dX_p = Σ_j A_pj / Z_j · dS_j. `iters=1` aggregates once with affinities to S⁰.
    """
    affinity, norm = super_token_affinities(x, grid, iters)
    return super_token_aggregate(x, affinity, norm, grid)


BACKENDS = ('auto', 'reference', 'triton')
BACKEND_ENV = 'TIMM_SUPERTOKEN_BACKEND'
_MAX_FUSED_GRID = 4  # timm_supertoken.ops.MAX_FUSED_GRID, repeated here so 'auto' decides without importing Triton
_TRITON_AVAILABLE = importlib.util.find_spec('triton') is not None  # looked up once, outside torch.compile's trace


@torch.jit.ignore
def _use_fused(x: torch.Tensor, grid: int, backend: str) -> bool:
    """Pick the implementation: False = reference path, True = the fused Triton op.

    torch.jit tracing, torch.fx symbolic tracing, torch.export and ONNX export always get the reference
    path, which is made of exportable ops. `'auto'` (overridable by $TIMM_SUPERTOKEN_BACKEND) takes the
    fused op for CUDA fp32/fp16/bf16 tensors when Triton is importable and the grid is one the kernels
    support (≤ 4).
    """
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_exporting() \
            or torch.onnx.is_in_onnx_export():
        return False
    if backend == 'auto':
        backend = os.environ.get(BACKEND_ENV, 'auto')
        if backend not in BACKENDS:
            raise ValueError(f'${BACKEND_ENV} must be one of {BACKENDS}, got {backend!r}')
    if backend == 'reference':
        return False
    if backend == 'triton':
        return True  # the op itself raises a clear error for a CPU tensor outside the interpreter
    return _TRITON_AVAILABLE and x.is_cuda and x.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        and grid <= _MAX_FUSED_GRID


@torch.jit.ignore
def _fused_super_token_clustering(x: torch.Tensor, grid: int, iters: int) -> torch.Tensor:
    from ..ops import super_token_clustering_triton  # imports Triton: only when the fused path is taken
    return super_token_clustering_triton(x, grid, iters, validate=False)


@register_notrace_module
class SuperTokenClustering(nn.Module):
    """Parameter-free super-token clustering: (B, C, H, W) -> (B, C, ⌈H/grid⌉, ⌈W/grid⌉).

    Args:
        grid: side of the cell each super token starts from (paper: 2×2 average pooling).
        iters: number of affinity computations t (paper Table 8; t=3 is the paper's choice).
        backend: 'reference' (pure PyTorch, runs everywhere), 'triton' (the fused kernels of
            `timm_supertoken.ops`: CUDA tensors, or CPU ones under TRITON_INTERPRET=1) or 'auto' (the
            default: $TIMM_SUPERTOKEN_BACKEND if set, else fused for fp32/fp16/bf16 CUDA tensors when Triton
            is importable and grid ≤ 4). TorchScript, tracing, torch.fx, torch.export and ONNX export always
            use the reference path.
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
        if not torch.jit.is_scripting() and not torch.compiler.is_compiling():
            check_super_token_input(x, self.grid, self.iters)
        if not torch.jit.is_scripting():
            if _use_fused(x, self.grid, self.backend):
                return _fused_super_token_clustering(x, self.grid, self.iters)
        return super_token_clustering(x, self.grid, self.iters)

    def extra_repr(self) -> str:
        backend = '' if self.backend == 'auto' else f', backend={self.backend}'
        return f'grid={self.grid}, iters={self.iters}{backend}'
