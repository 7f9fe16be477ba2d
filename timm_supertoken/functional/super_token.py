"""Super-token clustering, the maths: the pure-PyTorch reference path and the operator's input contract.

Paper: *Lightweight ViT Convolutional Embedding Module Based on Super-Token Clustering* (J. DCS 2024),
eqs. 2-4 (docs/design.md §2). The reference path below is the specification of the operator: it is
vectorised over cells, pixels and the batch, and uses only pad / slicing / reshape / batched matmul /
softmax, so it runs everywhere (CPU, CUDA, the meta device, TorchScript, torch.fx, ONNX export). The
fused Triton kernels of `timm_supertoken.ops` implement the same equations; the module that chooses
between the two is `timm_supertoken.layers.SuperTokenClustering`. Both import from here, and this
module imports neither.
"""
from typing import List, Tuple

import torch
import torch.nn.functional as F

from timm.layers import register_notrace_function

__all__ = [
    'super_token_clustering', 'super_token_affinities', 'super_token_aggregate', 'check_super_token_input',
    'check_finite', 'check_finite_result', 'FUSED_DTYPES', 'MAX_FUSED_GRID',
]

# The fused kernels accumulate in fp32: float64 would silently lose precision there.
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A pixel's 3×3 neighbourhood spans (3g)² pixels: the fused kernels unroll g² sub-pixels, and beyond g = 4
# the reference path (which batches any g) is the better tool.
MAX_FUSED_GRID = 4


def _neighbourhood(s: torch.Tensor) -> torch.Tensor:
    """Gather the 3×3 neighbour super tokens of every cell: (B, h, w, C) -> (B, h, w, 9, C), zeros off-grid.

    Nine slices and a stack, not `unfold`: TorchScript-based ONNX export cannot size an unfold of a padded map.
    """
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


def _affinity(pixels: torch.Tensor, tokens: torch.Tensor, off_grid: torch.Tensor, scale: float) -> torch.Tensor:
    """Eq. 2-3: each pixel's softmax over the 9 super tokens around its cell, off-grid ones masked: (B, h, w, P, 9).

    `off_grid` is the additive mask (B·h·w, 1, 9), 0 or -inf, so scaling and masking ride on the batched
    matmul. Padded pixels get weights too; the callers zero them or aggregate them as nothing.
    """
    B, h, w, P, C = pixels.shape
    neighbours = _neighbourhood(tokens).reshape(-1, 9, C).transpose(1, 2)
    logits = torch.baddbmm(off_grid, pixels.reshape(-1, P, C), neighbours, alpha=scale)
    return logits.softmax(-1).reshape(B, h, w, P, 9)


def _token_sums(affinity: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ_p A_pj v_p over the pixels of the 3×3 cells around each token j: (B,h,w,P,9), (B,h,w,P,D) -> (B,h,w,D)."""
    B, h, w, P, D = values.shape
    per_cell = torch.bmm(affinity.reshape(-1, P, 9).transpose(1, 2), values.reshape(-1, P, D))
    return _scatter_neighbourhood(per_cell.reshape(B, h, w, 9, D))


def _aggregate(affinity: torch.Tensor, pixels_and_real: torch.Tensor) -> torch.Tensor:
    """Eq. 4: s_j = Σ_p A_pj x_p / Σ_p A_pj over the real pixels around j, -> (B, h, w, C).

    The last channel of `pixels_and_real` is 1 for a real pixel and 0 for padding (whose x is 0 too), so
    one weighted sum yields both the numerator and Z_j = Σ_p A_pj. Every cell owns a real pixel, so Z_j > 0;
    the ε of STViT only guards the division.
    """
    sums = _token_sums(affinity, pixels_and_real)
    return sums[..., :-1] / (sums[..., -1:] + 1e-12)


@torch.jit.ignore
def check_super_token_input(x: torch.Tensor, grid: int, iters: int) -> None:
    """Reject shapes, dtypes and settings the operator would silently turn into garbage; free (no sync)."""
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


@torch.jit.ignore
def check_finite(x: torch.Tensor) -> None:
    """Reject NaN/Inf input: one pass over X and a host sync, so callers decide when it is worth it."""
    if not x.is_meta and not bool(torch.isfinite(x).all()):
        raise ValueError('super-token clustering input contains NaN or Inf values')


@torch.jit.ignore
def check_finite_result(x: torch.Tensor, tokens: torch.Tensor) -> None:
    """Reject a non-finite result of the reference path, naming its cause; one reduction over the g²-smaller output.

    A NaN/Inf pixel reaches its cell's S⁰ (a mean with weight > 0), so every logit of its own softmax row is
    NaN or ±inf and that row, hence a super token next to it, comes out NaN: non-finite input always shows
    in the output, and X is scanned only to say which cause it was. Finite input can still overflow the
    logits ⟨x_p, s_j⟩/√C.
    """
    if tokens.is_meta:
        return
    with torch.no_grad():
        if bool(torch.isfinite(tokens.sum(dtype=torch.float32))):
            return
        check_finite(x)
        if not bool(torch.isfinite(tokens).all()):
            raise ValueError(
                f'super-token clustering of a finite input produced NaN: the affinity logits ⟨x_p, s_j⟩/√C overflow '
                f'{str(_compute_dtype(x)).split(".")[-1]} (max |x| = {x.abs().max().item():.3g}); normalise the feature map')


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
    B, h, w, P, _ = pixels.shape
    real = _to_cells(torch.ones_like(pixels[:1, 0, 0, 0, :1]).expand(1, 1, x.shape[2], x.shape[3]), grid)
    on_grid = _neighbourhood(torch.ones_like(real[:, :, :, 0]))  # (1, h, w, 9, 1): 1 where the neighbour exists
    off_grid = torch.zeros_like(on_grid).masked_fill(on_grid == 0, float('-inf'))
    off_grid = off_grid.expand(B, h, w, 9, 1).reshape(B * h * w, 1, 9)
    scale = C ** -0.5

    tokens = pixels.sum(3) / real.sum(3)  # S⁰: mean of each cell's real pixels
    if iters > 1:
        pixels_and_real = torch.cat([pixels, real.expand(B, h, w, P, 1)], -1)
        for _ in range(iters - 1):
            tokens = _aggregate(_affinity(pixels, tokens, off_grid, scale), pixels_and_real)
    affinity = _affinity(pixels, tokens, off_grid, scale) * real  # padded pixels weigh nothing
    return affinity, _scatter_neighbourhood(affinity.sum(3).unsqueeze(-1)) + 1e-12


def super_token_aggregate(x: torch.Tensor, affinity: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    """The differentiable last aggregation S_j = Σ_p A_pj x_p / Z_j, (B, C, H, W) -> (B, C, h, w)."""
    tokens = _token_sums(affinity, _to_cells(x.to(affinity.dtype), grid)) / norm
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
