"""Super-token clustering, the maths: the pure-PyTorch reference path and the operator's input contract.

Paper: *Lightweight ViT Convolutional Embedding Module Based on Super-Token Clustering* (J. DCS 2024),
eqs. 2-4 (docs/design.md §2). The reference path below is the specification of the operator: it is
vectorised over cells, pixels and the batch, and uses only pad / slicing / reshape / batched matmul /
masked softmax (plus a gather or scatter for the 9-neighbour form of the affinities), so it runs everywhere
(CPU, CUDA, the meta device, TorchScript, torch.fx, ONNX export). The fused Triton kernels of
`timm_supertoken.ops` implement the same equations; the module that chooses between the two is
`timm_supertoken.layers.SuperTokenClustering`. Both import from here, and this module imports neither.
"""
from typing import Tuple

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
# STViT's ε in Z_j = Σ_p A_pj + ε. Every cell owns a real pixel, so Z_j > 0 and ε only guards the division;
# the reference path (`_norm`) and the fused kernels must add the same one.
NORM_EPS = 1e-12


# Cells per row block: a pixel's logits are computed against every super token of its block's window,
# 3(m+2) of them for the 9 it needs, so wider blocks waste FLOPs and narrower ones add batched-matmul calls.
# 14 puts a row of the model's 14×14 token grid in one block; wider rows are split evenly (24 cells: 2×12),
# which matched blocks of 8 at 48² and 96² maps, where blocks of 16 or more lost (2 CPU cores, docs/design.md §2).
BLOCK_CELLS = 14


def _block_layout(w: int, max_cells: int = BLOCK_CELLS) -> Tuple[int, int]:
    """Split a row of w cells into n blocks of m ≤ max_cells cells, as even as possible: (n, m)."""
    n = (w + max_cells - 1) // max_cells
    return n, (w + n - 1) // n


def _to_blocks(x: torch.Tensor, grid: int, n: int, m: int) -> torch.Tensor:
    """Group pixels by cell and cells by row block: (B, C, H, W) -> (B, h, n, m·grid², C), zeros for padding.

    Pixel rows and columns are zero-padded to whole cells, and cell columns to n·m (empty cells).
    """
    B, C, H, W = x.shape
    h = (H + grid - 1) // grid
    x = F.pad(x, (0, n * m * grid - W, 0, h * grid - H))
    x = x.reshape(B, C, h, grid, n, m, grid).permute(0, 2, 4, 5, 3, 6, 1)
    return x.reshape(B, h, n, m * grid * grid, C)


def _windows(tokens: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The super tokens each row block sees: (B, h, w, C) -> (B, h, n, 3(m+2), C), zeros off the grid.

    Block (i, q) holds cells (i, qm..qm+m-1); their 3×3 neighbours lie in token rows i-1..i+1 and columns
    qm-1..qm+m, stored row by row. Slices and one concatenation keep it exportable (no unfold).
    """
    h, w = tokens.shape[1], tokens.shape[2]
    padded = F.pad(tokens, (0, 0, 1, n * m + 1 - w, 1, 1))  # (B, h + 2, n·m + 2, C)
    if n == 1:
        columns = padded.unsqueeze(2)
    else:
        columns = torch.stack([padded[:, :, q * m:q * m + m + 2] for q in range(n)], 2)
    return torch.cat([columns[:, r:r + h] for r in range(3)], 3)


def _from_windows(blocks: torch.Tensor, n: int, m: int, w: int) -> torch.Tensor:
    """Adjoint of `_windows`: sum what every row block sent to each token, (B, h, n, 3(m+2), D) -> (B, h, w, D)."""
    B, h, D = blocks.shape[0], blocks.shape[1], blocks.shape[-1]
    blocks = blocks.reshape(B, h, n, 3, m + 2, D)
    total = blocks.new_zeros(B, h + 2, n * m + 2, D)
    for r in range(3):
        for q in range(n):
            total[:, r:r + h, q * m:q * m + m + 2] += blocks[:, :, q, r]
    return total[:, 1:h + 1, 1:w + 1]


def _window_mask(h: int, w: int, n: int, m: int, P: int, like: torch.Tensor) -> torch.Tensor:
    """Additive mask (h, n, m·P, 3(m+2)): 0 where a window token is one of the pixel's 9 on-grid neighbours, else -inf.

    Pixels of the empty cells that pad the last block see their whole window, so their softmax stays finite;
    their values and ones channel are 0, so they add nothing.
    """
    blocks = torch.arange(n, device=like.device)[:, None] * m
    cell_col = (blocks + torch.arange(m, device=like.device)).repeat_interleave(P, 1)  # (n, m·P)
    token_col = (blocks + torch.arange(m + 2, device=like.device) - 1).repeat(1, 3)  # (n, 3(m+2))
    # window row r of each of the 3(m+2) slots as an integer division: ONNX export turns repeat_interleave by a
    # symbolic m + 2 into an Expand that onnxruntime rejects
    token_row = torch.arange(h, device=like.device)[:, None] \
        + torch.arange(3 * (m + 2), device=like.device) // (m + 2) - 1  # (h, 3(m+2))
    near = (token_col[:, None, :] - cell_col[:, :, None]).abs() <= 1
    on_grid = ((token_row >= 0) & (token_row < h))[:, None, None, :] \
        & ((token_col >= 0) & (token_col < w))[None, :, None, :]
    valid = (near[None] & on_grid) | (cell_col >= w)[None, :, :, None]
    return torch.zeros(valid.shape, dtype=like.dtype, device=like.device).masked_fill(~valid, float('-inf'))


def _window_index(m: int, P: int, device: torch.device) -> torch.Tensor:
    """(m·P, 9): where in its block's window each pixel's neighbour k = 3·dy + dx sits (row dy, column cell + dx)."""
    cell = torch.arange(m, device=device).repeat_interleave(P)[:, None]
    k = torch.arange(9, device=device)[None, :]
    return (k // 3) * (m + 2) + cell + k % 3


def _affinity(pixels: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, scale: float, n: int, m: int
              ) -> torch.Tensor:
    """Eq. 2-3: each pixel's softmax over the 9 super tokens around its cell, in window form (B, h, n, m·P, 3(m+2)).

    One matmul per row block gives every pixel's logits against its block's whole window; the mask leaves
    exactly its 9 on-grid neighbours (exp(-inf) = 0). On a CPU, B·h·n such products beat B·h·w tiny
    (P×C)·(C×9) ones, whose time goes to call overhead (docs/design.md §2). Padded pixels get weights too; the
    ones channel of the values they are summed with is 0.
    """
    logits = torch.matmul(pixels, _windows(tokens * scale, n, m).transpose(-1, -2))
    return (logits + mask).softmax(-1)


def _aggregate(affinity: torch.Tensor, values: torch.Tensor, n: int, m: int, w: int) -> torch.Tensor:
    """Σ_p A_pj v_p over the pixels of the 3×3 cells around each super token j: -> (B, h, w, D)."""
    return _from_windows(torch.matmul(affinity.transpose(-1, -2), values), n, m, w)


def _norm(sums: torch.Tensor, eps: float = NORM_EPS) -> torch.Tensor:
    """Z_j = Σ_p A_pj + ε, from the last channel of an aggregation of pixels-and-ones (the ones channel).

    ε is an argument because TorchScript cannot read a float global.
    """
    return sums[..., -1:] + eps


def _tokens(sums: torch.Tensor) -> torch.Tensor:
    """Eq. 4: s_j = Σ_p A_pj x_p / Z_j, from sums whose last channel is the ones channel.

    With all weights 1 it is S⁰, the mean of a cell's real pixels.
    """
    return sums[..., :-1] / _norm(sums)


def _pixels_and_ones(x: torch.Tensor, grid: int, n: int, m: int) -> torch.Tensor:
    """x in block layout plus a last channel that is 1 on real pixels and 0 on padding: (B, h, n, m·grid², C + 1)."""
    B, H, W = x.shape[0], x.shape[2], x.shape[3]
    ones = torch.ones_like(x[:1, :1, :1, :1]).expand(B, 1, H, W)
    return _to_blocks(torch.cat([x, ones], 1), grid, n, m)


def _last_affinities(values: torch.Tensor, w: int, grid: int, iters: int, n: int, m: int) -> torch.Tensor:
    """The `iters` affinity computations of eq. 2-4 on pixels-and-ones blocks; returns the last, in window form."""
    B, h, C = values.shape[0], values.shape[1], values.shape[-1] - 1
    P = grid * grid
    pixels = values[..., :C]
    mask = _window_mask(h, w, n, m, P, values)
    scale = C ** -0.5
    tokens = _tokens(values.reshape(B, h, n * m, P, C + 1)[:, :, :w].sum(3))  # S⁰
    affinity = _affinity(pixels, tokens, mask, scale, n, m)
    for _ in range(iters - 1):
        affinity = _affinity(pixels, _tokens(_aggregate(affinity, values, n, m, w)), mask, scale, n, m)
    return affinity


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
            dtype = str(_compute_dtype(x)).split('.')[-1]
            raise ValueError(
                f'super-token clustering of a finite input produced NaN: the affinity logits ⟨x_p, s_j⟩/√C '
                f'overflow {dtype} (max |x| = {x.abs().max().item():.3g}); normalise the feature map')


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are clustered in float32 (the fused kernel accumulates in fp32 too)."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _grid_layout(x: torch.Tensor, grid: int) -> Tuple[int, int, int]:
    """Super tokens per column (w) and the row blocks (n, m) of a (B, C, H, W) map: (w, n, m)."""
    w = (x.shape[3] + grid - 1) // grid
    if not torch.jit.is_scripting() and isinstance(w, torch.SymInt):
        # a symbolic width (torch.export / ONNX export with a dynamic width): the block count is a Python loop
        # count, which the exporter would silently specialise to the example's width, so one block spans the row
        # (the same sums: the mask keeps each pixel's 9 neighbours, the extra window tokens weigh exactly 0)
        return w, 1, w
    n, m = _block_layout(w)
    return w, n, m


def super_token_affinities(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the `iters` clustering iterations of eq. 2-4 and return the last affinities and their sums.

    Returns A of shape (B, h, w, grid², 9), the softmax weights of every pixel of cell (i, j) to its
    3×3 neighbour super tokens, k = 3·dy + dx (zero for padded pixels and off-grid neighbours), and Z of
    shape (B, h, w, 1), Z_j = Σ_p A_pj + ε. No gradient flows through either (STViT's rule).
    """
    w, n, m = _grid_layout(x, grid)
    values = _pixels_and_ones(x.detach().to(_compute_dtype(x)), grid, n, m)
    B, h, C = values.shape[0], values.shape[1], values.shape[-1] - 1
    affinity = _last_affinities(values, w, grid, iters, n, m)
    norm = _norm(_aggregate(affinity, values[..., C:], n, m, w))
    index = _window_index(m, grid * grid, x.device).expand(B, h, n, m * grid * grid, 9)
    nine = affinity.gather(-1, index) * values[..., C:]  # padded pixels weigh nothing
    return nine.reshape(B, h, n * m, grid * grid, 9)[:, :, :w], norm


def super_token_aggregate(x: torch.Tensor, affinity: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    """The differentiable last aggregation S_j = Σ_p A_pj x_p / Z_j, (B, C, H, W) -> (B, C, h, w).

    `affinity` and `norm` as `super_token_affinities` returns them.
    """
    B, h, w, P, _ = affinity.shape
    n, m = _block_layout(w)
    nine = F.pad(affinity, (0, 0, 0, 0, 0, n * m - w)).reshape(B, h, n, m * P, 9)
    index = _window_index(m, P, affinity.device).expand(B, h, n, m * P, 9)
    windowed = torch.zeros(B, h, n, m * P, 3 * (m + 2), dtype=affinity.dtype, device=affinity.device)
    windowed = windowed.scatter(-1, index, nine)
    tokens = _aggregate(windowed, _to_blocks(x.to(affinity.dtype), grid, n, m), n, m, w) / norm
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
    w, n, m = _grid_layout(x, grid)
    values = _pixels_and_ones(x.to(_compute_dtype(x)), grid, n, m)
    affinity = _last_affinities(values.detach(), w, grid, iters, n, m)
    # the ones channel carries no gradient, so Z_j is a constant of the backward pass as in STViT
    return _tokens(_aggregate(affinity, values, n, m, w)).permute(0, 3, 1, 2).to(x.dtype)
