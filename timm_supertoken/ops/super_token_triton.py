"""Fused Triton super-token clustering: forward and backward kernels, their launch plan and custom op.

The equations are those of the reference path, `timm_supertoken.functional.super_token`, which is the
specification. For X of shape (B, C, H, W), grid g, h = ⌈H/g⌉, w = ⌈W/g⌉, t iterations:

    S⁰_j  = mean of the real pixels of cell j                                   `_cell_mean_kernel`
    A_pk  = softmax_k(⟨x_p, s_k⟩ · C^-½) over the 3×3 cells k around p's cell     `_affinity_kernel`
    Z_j   = Σ_p A_pj + ε,       s_j ← Σ_p A_pj x_p / Z_j                          `_aggregate_kernel`
    dX_p  = Σ_k A_pk / Z_k · dS_k                                                  `_backward_kernel`

Every launch does a few FLOPs per byte (`traffic_model`), so it is bound by memory or by the instructions
it issues, never by arithmetic; the kernels are written for few instructions (docs/kernels.md):
- one affinity row per pixel per iteration, stored as A (B, 9, H, W), and one aggregation row per token
  gathering its ≤ 9g² weighted pixels: two launches per iteration, the least the dependence between
  neighbouring tokens allows without recomputing;
- the nine slots are unrolled; an off-grid token is read at its clamped position with weight 0, so token
  loads need no mask, and `EVEN_C` / `EVEN_MAP` drop the channel and border masks where they cannot bite;
- a 9-point stencil, not a matrix product: no tensor cores; half-precision inputs are converted in
  registers and all arithmetic, and the running tokens, are fp32;
- channels_last (NHWC) only: a row's channels are contiguous, so tiles move in 128-bit accesses, and an
  NCHW input is converted once;
- the backward gathers the 9 dS tokens of each pixel: deterministic, no atomics.

Block sizes and warps are autotuned per shape among configs the kernel report holds free of local memory
at every map the models produce (tests/test_kernel_report.py); `timm_supertoken.layers.config` turns
autotuning off. The custom op `timm_supertoken::super_token_clustering` keeps the fused op in
torch.compile's graph; eager calls go through `_SuperTokenClustering`, the same launches without the
custom op's dispatch, and a launch seen before skips Triton's JIT where `_triton_compat` allows it.
"""
import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime import Autotuner

from ..functional.super_token import FUSED_DTYPES, MAX_FUSED_GRID, NORM_EPS, check_finite, check_super_token_input
from ..layers.config import is_autotune_enabled
from ._triton_compat import DIRECT_LAUNCH_TRITON, direct_launcher, is_interpreted, kernel_arg_names, launch_hooks_set

__all__ = [
    'super_token_clustering_triton', 'forward_plan', 'backward_plan', 'traffic_model', 'Launch', 'LaunchCost',
    'INTERPRET', 'DIRECT_LAUNCH', 'AUTOTUNED_KERNELS', 'run_plan',
]

_NORM_EPS: tl.constexpr = tl.constexpr(NORM_EPS)  # the reference's ε, as a constant the kernels can read


def _times_configs() -> bool:
    """Whether a new shape times its fitting configs (on a GPU, autotuning on) or keeps the first one."""
    return is_autotune_enabled() and not INTERPRET


def _row_autotune(rows: str, rows_and_warps: Tuple[Tuple[int, int], ...], tile: str,
                  tile_bytes: Callable[[int], int]) -> Dict[str, Any]:
    """`triton.autotune` arguments: `rows` per program × warps, keeping the configs whose [rows, BLOCK_C] tile
    of the `tile` argument holds at most `tile_bytes(GRID)` bytes per thread, and at least 16 where C allows.

    At most the budget, in bytes, so a half-precision input runs tiles twice as tall as fp32 does; at
    least 16 bytes, so that each thread reads its share with 128-bit loads. Where no config is within the
    budget, the one with the smallest tile per thread runs. The interpreter cannot time configs (it gives
    the same numbers for each): it keeps the first that fits.
    """
    configs = [triton.Config({rows: n}, num_warps=warps, num_stages=1) for n, warps in rows_and_warps]

    def fitting(configs: List[triton.Config], named_args: Dict[str, Any], **kwargs) -> List[triton.Config]:
        per_row = named_args[tile].element_size() * kwargs['BLOCK_C']
        per_thread = {id(c): c.kwargs[rows] * per_row / (c.num_warps * 32) for c in configs}
        within = [c for c in configs if per_thread[id(c)] <= tile_bytes(kwargs['GRID'])]
        fit = ([c for c in within if per_thread[id(c)] >= 16] or within
               or [min(configs, key=lambda c: per_thread[id(c)])])
        return fit if _times_configs() else fit[:1]

    arguments = dict(configs=configs, key=['C', 'H', 'W', 'GRID'], prune_configs_by={'early_config_prune': fitting})
    if 'do_bench' in inspect.signature(triton.autotune).parameters:  # Triton >= 3.2
        arguments['do_bench'] = _time_config
    return arguments


def _time_config(kernel_call: Callable[[], None], quantiles: Tuple[float, ...]) -> List[float]:
    """The autotuner's timing of a config, skipped where `fitting` keeps one config: Triton 3.6 and older time
    even a lone config, with its launches and an L2 flush per kernel and new shape."""
    if _times_configs():
        from triton.testing import do_bench  # what the autotuner times with by default on CUDA
        return do_bench(kernel_call, quantiles=quantiles)
    return [0.0] * len(quantiles)


# The loaded tiles, their fp32 products and the partial sums stay in registers (≤ 128 per thread), at every map
# the models produce (tests/test_kernel_report.py). The affinity's X tile holds ≤ 32 bytes per thread (two 128-bit
# loads); at grid 1 (a token per pixel, conv_modules=7) ptxas spills that on sm_80, so 16. The aggregation keeps
# a cell's g² pixel tiles in flight: 64 bytes per thread up to grid 2, shrinking with g² beyond (at grid 4, 64
# bytes spilled or left 8-12 warps resident). The backward's nine dS tiles are all in flight at once, so its
# tile holds 16: at 32 bytes, fp32 on sm_90 needs more than 128 registers and spills. The configs with few rows
# per warp are those that keep 16 bytes per thread at 32 channels in half precision (conv_modules=3) or at
# grid 4 in fp32; with more rows per thread than that the backward spilled.
_TOKEN_AUTOTUNE = _row_autotune('BLOCK_N', ((32, 4), (16, 2), (32, 8), (64, 8), (16, 8)), 'x_ptr',
                                lambda grid: 64 * 4 // max(4, grid * grid))
_AFFINITY_AUTOTUNE = _row_autotune('BLOCK_M', ((32, 4), (64, 8), (32, 8), (16, 4)), 'x_ptr',
                                   lambda grid: 32 if grid > 1 else 16)
_BACKWARD_AUTOTUNE = _row_autotune(
    'BLOCK_M', ((32, 8), (16, 4), (8, 2), (64, 16), (16, 8), (8, 4), (32, 16), (32, 4)), 'grad_ptr',
    lambda grid: 16)


@triton.jit
def _token_rows(h, w, BLOCK_N: tl.constexpr):
    """This program's tokens of image program_id(1): (image, token index n, n in range, cell row, cell column)."""
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, n, n < h * w, n // w, n % w


@triton.jit
def _pixel_rows(H, W, GRID: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's pixels of image program_id(1): (image, pixel index p, p in range, its cell's row, column).

    Rows past the map take the map's last pixel, so every address they form is in bounds and only their
    stores need a mask.
    """
    b = tl.program_id(1).to(tl.int64)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    p = tl.minimum(m, H * W - 1)
    return b, p, m < H * W, (p // W) // GRID, (p % W) // GRID


@triton.jit
def _on_grid(i, n, D: tl.constexpr):
    """Cell coordinate i + D lies in [0, n) for i in [0, n): one comparison, none for D = 0 (D is -1, 0 or 1)."""
    if D < 0:
        return i > 0
    elif D > 0:
        return i < n - 1
    else:
        return i >= 0


@triton.jit
def _clamped(i, n, D: tl.constexpr):
    """Cell coordinate i + D clamped onto [0, n): an off-grid slot reads a real token and gets weight A = 0."""
    if D < 0:
        return tl.maximum(i - 1, 0)
    elif D > 0:
        return tl.minimum(i + 1, n - 1)
    else:
        return i


@triton.jit
def _row_ptrs(base, n, c, C):
    """Addresses of the [rows, BLOCK_C] tile of rows n (pixels or tokens) of a channels-last (rows, C) plane."""
    return base + (n * C)[:, None] + c[None, :]


@triton.jit
def _load_rows(base, n, c, cm, C, EVEN_C: tl.constexpr):
    """The [rows, BLOCK_C] tile of rows n (all in bounds): masked only where C is not a multiple of BLOCK_C."""
    ptrs = _row_ptrs(base, n, c, C)
    if EVEN_C:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=cm[None, :], other=0.0)


@triton.jit
def _store_rows(base, n, value, row_ok, c, cm, C):
    """Store a [rows, BLOCK_C] tile to rows n of a channels-last (rows, C) plane, for real rows and channels."""
    tl.store(_row_ptrs(base, n, c, C), value, mask=row_ok[:, None] & cm[None, :])


@triton.jit
def _neighbour(i, j, h, w, DY: tl.constexpr, DX: tl.constexpr):
    """Token index of the cell at offset (DY, DX) from each row's cell (i, j), clamped onto the grid.

    Its loads need no mask: the caller gives an off-grid slot weight 0 (a -inf logit, or the A = 0 that
    such a logit made).
    """
    return _clamped(i, h, DY) * w + _clamped(j, w, DX)


@triton.jit
def _cell_pixel(y0, x0, q, cell_ok, H, W, GRID: tl.constexpr, EVEN_MAP: tl.constexpr):
    """Pixel q (row-major) of the cell whose first pixel is (y0, x0): (y·W + x, the pixel is real).

    A border cell of a map that the grid does not divide is partial: its missing pixels are clamped onto
    the map, so their address is in bounds, and are not real.
    """
    y = y0 + q // GRID
    x = x0 + q % GRID
    if EVEN_MAP:
        return y * W + x, cell_ok
    else:
        return tl.minimum(y, H - 1) * W + tl.minimum(x, W - 1), cell_ok & (y < H) & (x < W)


@triton.jit
def _cell_mean_kernel(
        x_ptr, tok_ptr,
        C, H, W, h, w,
        GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_MAP: tl.constexpr,
):
    """S⁰_j = mean of the real pixels of cell j, into the fp32 tokens. Rows: tokens of image program_id(1)."""
    b, n, row_ok, i, j = _token_rows(h, w, BLOCK_N)
    # border cells of a map that the grid does not divide hold fewer pixels
    count = tl.minimum(H - i * GRID, GRID) * tl.minimum(W - j * GRID, GRID)
    count = tl.where(row_ok, count, 1).to(tl.float32)
    x_base = x_ptr + b * H * W * C
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        for q in tl.static_range(GRID * GRID):
            pixel, ok = _cell_pixel(i * GRID, j * GRID, q, row_ok, H, W, GRID, EVEN_MAP)
            acc += tl.load(_row_ptrs(x_base, pixel, c, C), mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
        _store_rows(tok_ptr + b * h * w * C, n, acc / count[:, None], row_ok, c, cm, C)


@triton.jit
def _logit(xt, t_base, i, j, h, w, c, cm, C, DY: tl.constexpr, DX: tl.constexpr, EVEN_C: tl.constexpr):
    """⟨x_p, s_k⟩ over one channel block, for the token k at cell offset (DY, DX) from p's cell clamped onto the grid."""
    return tl.sum(xt * _load_rows(t_base, _neighbour(i, j, h, w, DY, DX), c, cm, C, EVEN_C), axis=1)


@triton.jit
def _slot_logit(logit, i, j, h, w, DY: tl.constexpr, DX: tl.constexpr):
    """The logit of slot (DY, DX) where its token exists, -inf (A = 0) where it is off the grid."""
    return tl.where(_on_grid(i, h, DY) & _on_grid(j, w, DX), logit, float('-inf'))


@triton.jit
def _store_slot(a_base, e, inv_den, p, row_ok, HW, K: tl.constexpr):
    """A_pK = e_K / Σ_k e_k into slot plane K of aff, for the real pixels."""
    tl.store(a_base + K * HW + p, e * inv_den, mask=row_ok)


@triton.autotune(**_AFFINITY_AUTOTUNE)
@triton.jit
def _affinity_kernel(
        x_ptr, tok_ptr, aff_ptr,
        C, H, W, h, w, scale_log2e,
        GRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    """A_pk = softmax_k(⟨x_p, s_k⟩·C^-½) over the 3×3 tokens k around p's cell, into aff (B, 9, H, W).

    Rows: pixels of image program_id(1). Slot k = (dy + 1)·3 + (dx + 1) for the token at cell offset
    (dy, dx); slots off the grid get A = 0. The stencil is unrolled: each slot's logit is a [rows] vector
    and the softmax runs over the nine of them, so no [rows, 9] tile is built, masked or reduced.
    The logits are scaled by C^-½·log₂e so that the softmax's exponentials are exp2.
    """
    b, p, row_ok, i, j = _pixel_rows(H, W, GRID, BLOCK_M)
    x_base = x_ptr + b * H * W * C
    t_base = tok_ptr + b * h * w * C
    l0 = tl.zeros((BLOCK_M,), dtype=tl.float32)
    l1 = l0
    l2 = l0
    l3 = l0
    l4 = l0
    l5 = l0
    l6 = l0
    l7 = l0
    l8 = l0
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        xt = _load_rows(x_base, p, c, cm, C, EVEN_C).to(tl.float32)
        l0 += _logit(xt, t_base, i, j, h, w, c, cm, C, -1, -1, EVEN_C)
        l1 += _logit(xt, t_base, i, j, h, w, c, cm, C, -1, 0, EVEN_C)
        l2 += _logit(xt, t_base, i, j, h, w, c, cm, C, -1, 1, EVEN_C)
        l3 += _logit(xt, t_base, i, j, h, w, c, cm, C, 0, -1, EVEN_C)
        l4 += _logit(xt, t_base, i, j, h, w, c, cm, C, 0, 0, EVEN_C)
        l5 += _logit(xt, t_base, i, j, h, w, c, cm, C, 0, 1, EVEN_C)
        l6 += _logit(xt, t_base, i, j, h, w, c, cm, C, 1, -1, EVEN_C)
        l7 += _logit(xt, t_base, i, j, h, w, c, cm, C, 1, 0, EVEN_C)
        l8 += _logit(xt, t_base, i, j, h, w, c, cm, C, 1, 1, EVEN_C)
    # a pixel always sees its own cell (slot 4, finite even past the map): the max is finite and den ≥ 1
    l0 = _slot_logit(l0 * scale_log2e, i, j, h, w, -1, -1)
    l1 = _slot_logit(l1 * scale_log2e, i, j, h, w, -1, 0)
    l2 = _slot_logit(l2 * scale_log2e, i, j, h, w, -1, 1)
    l3 = _slot_logit(l3 * scale_log2e, i, j, h, w, 0, -1)
    l4 = l4 * scale_log2e
    l5 = _slot_logit(l5 * scale_log2e, i, j, h, w, 0, 1)
    l6 = _slot_logit(l6 * scale_log2e, i, j, h, w, 1, -1)
    l7 = _slot_logit(l7 * scale_log2e, i, j, h, w, 1, 0)
    l8 = _slot_logit(l8 * scale_log2e, i, j, h, w, 1, 1)
    top = tl.maximum(tl.maximum(tl.maximum(l0, l1), tl.maximum(l2, l3)),
                     tl.maximum(tl.maximum(l4, l5), tl.maximum(tl.maximum(l6, l7), l8)))
    e0 = tl.exp2(l0 - top)
    e1 = tl.exp2(l1 - top)
    e2 = tl.exp2(l2 - top)
    e3 = tl.exp2(l3 - top)
    e4 = tl.exp2(l4 - top)
    e5 = tl.exp2(l5 - top)
    e6 = tl.exp2(l6 - top)
    e7 = tl.exp2(l7 - top)
    e8 = tl.exp2(l8 - top)
    inv_den = 1.0 / (((e0 + e1) + (e2 + e3)) + ((e4 + e5) + ((e6 + e7) + e8)))
    a_base = aff_ptr + b * 9 * H * W
    _store_slot(a_base, e0, inv_den, p, row_ok, H * W, 0)
    _store_slot(a_base, e1, inv_den, p, row_ok, H * W, 1)
    _store_slot(a_base, e2, inv_den, p, row_ok, H * W, 2)
    _store_slot(a_base, e3, inv_den, p, row_ok, H * W, 3)
    _store_slot(a_base, e4, inv_den, p, row_ok, H * W, 4)
    _store_slot(a_base, e5, inv_den, p, row_ok, H * W, 5)
    _store_slot(a_base, e6, inv_den, p, row_ok, H * W, 6)
    _store_slot(a_base, e7, inv_den, p, row_ok, H * W, 7)
    _store_slot(a_base, e8, inv_den, p, row_ok, H * W, 8)


@triton.autotune(**_TOKEN_AUTOTUNE)
@triton.jit
def _aggregate_kernel(
        x_ptr, aff_ptr, out_ptr, inv_norm_ptr,
        C, H, W, h, w,
        GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
        EVEN_MAP: tl.constexpr,
):
    """Z_j = Σ_p A_pj + ε and s_j = Σ_p A_pj x_p / Z_j over the pixels p of the 3×3 cells around j.

    Rows: tokens of image program_id(1). The pixel in cell j + (dy, dx) saw token j in its slot 8 - k,
    where k is that cell's slot seen from j. Writes s to out (fp32 tokens, or the output's dtype) and
    1/Z to inv_norm, the factor the backward multiplies by. Cells off the grid are clamped onto it and
    their pixels weighted 0, so only A's loads are masked; a cell's GRID² pixels are unrolled.
    """
    b, n, row_ok, i, j = _token_rows(h, w, BLOCK_N)
    x_base = x_ptr + b * H * W * C
    a_base = aff_ptr + b * 9 * H * W
    inv_norm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        norm = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the same in every channel block: cheaper than a pass
        for kk in range(9):
            ci = i + kk // 3 - 1  # the neighbour cell
            cj = j + kk % 3 - 1
            cell_ok = row_ok & (ci >= 0) & (ci < h) & (cj >= 0) & (cj < w)
            y0 = tl.minimum(tl.maximum(ci, 0), h - 1) * GRID
            x0 = tl.minimum(tl.maximum(cj, 0), w - 1) * GRID
            a_kk = a_base + (8 - kk) * (H * W)
            for q in tl.static_range(GRID * GRID):
                pixel, ok = _cell_pixel(y0, x0, q, cell_ok, H, W, GRID, EVEN_MAP)
                a = tl.load(a_kk + pixel, mask=ok, other=0.0)
                xt = _load_rows(x_base, pixel, c, cm, C, EVEN_C)
                acc += a[:, None] * xt.to(tl.float32)
                norm += a
        inv_norm = 1.0 / (norm + _NORM_EPS)
        _store_rows(out_ptr + b * h * w * C, n, acc * inv_norm[:, None], row_ok, c, cm, C)
    tl.store(inv_norm_ptr + b * h * w + n, inv_norm, mask=row_ok)


@triton.jit
def _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, HW,
                 DY: tl.constexpr, DX: tl.constexpr, EVEN_C: tl.constexpr):
    """acc + A_pk / Z_k · dS_k for the token k at cell offset (DY, DX) from p's cell (A_pk = 0 off the grid)."""
    k = _neighbour(i, j, h, w, DY, DX)
    g = _load_rows(g_base, k, c, cm, C, EVEN_C)
    weight = tl.load(a_base + ((DY + 1) * 3 + DX + 1) * HW + p) * tl.load(r_base + k)
    return acc + weight[:, None] * g.to(tl.float32)


@triton.autotune(**_BACKWARD_AUTOTUNE)
@triton.jit
def _backward_kernel(
        grad_ptr, aff_ptr, inv_norm_ptr, dx_ptr,
        C, H, W, h, w,
        GRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, EVEN_C: tl.constexpr,
):
    """dX_p = Σ_k A_pk / Z_k · dS_k over the 3×3 tokens k around p's cell. Rows: pixels of image program_id(1)."""
    b, p, row_ok, i, j = _pixel_rows(H, W, GRID, BLOCK_M)
    g_base = grad_ptr + b * h * w * C
    a_base = aff_ptr + b * 9 * H * W
    r_base = inv_norm_ptr + b * h * w
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, -1, -1, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, -1, 0, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, -1, 1, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, 0, -1, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, 0, 0, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, 0, 1, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, 1, -1, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, 1, 0, EVEN_C)
        acc = _gather_slot(acc, g_base, a_base, r_base, p, i, j, h, w, c, cm, C, H * W, 1, 1, EVEN_C)
        _store_rows(dx_ptr + b * H * W * C, p, acc, row_ok, c, cm, C)


# the kernels whose config an autotuner picks on the GPU, which the GPU benchmark reads back
AUTOTUNED_KERNELS = (_affinity_kernel, _aggregate_kernel, _backward_kernel)

# the kernels were built as interpreter functions iff TRITON_INTERPRET=1 was set when Triton loaded
INTERPRET: bool = is_interpreted(_cell_mean_kernel)
# whether a seen launch runs its compiled kernel without Triton's JIT (`_triton_compat.direct_launcher`)
DIRECT_LAUNCH: bool = DIRECT_LAUNCH_TRITON and not INTERPRET


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the fused op: what both the launcher and `compile_kernels` read.

    `grid` maps the chosen meta-parameters (BLOCK_M / BLOCK_N of an autotuned kernel) to the program grid.
    `loops` are the trip counts of the kernel's loops, outer to inner: what the kernel report needs to count
    the instructions a program issues. `label` names the launch where one kernel is compiled twice with
    different argument types.
    """
    kernel: Any
    grid: Callable[[Dict[str, Any]], Tuple[int, ...]]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    loops: Tuple[int, ...] = ()
    label: str = ''

    def __call__(self) -> None:
        key = (self.kernel, _current_device(), *map(_arg_key, self.args), *self.constexprs.values())
        known = _KNOWN_LAUNCHES.get(key)
        if known is None:
            _KNOWN_LAUNCHES[key] = self._through_triton()
            return
        if known.config is not None:
            self.kernel.best_config = known.config  # what the GPU benchmark reads back
        if known.launch is None or launch_hooks_set():
            known.jit[self.grid](*self.args, **known.kwargs)
            return
        known.launch(self.grid(known.kwargs), key[1], *self.args, *known.tail)

    def _through_triton(self) -> '_KnownLaunch':
        """The first launch of its kind: Triton's JIT compiles or finds the kernel, an autotuner picks its config."""
        kernel = self.kernel
        compiled = kernel[self.grid](*self.args, **self.constexprs)
        config = kernel.best_config if isinstance(kernel, Autotuner) else None
        jit = kernel if config is None else kernel.fn
        kwargs = self.constexprs if config is None else {**self.constexprs, **config.all_kwargs()}
        direct = DIRECT_LAUNCH and (config is None or config.pre_hook is None)
        launch = direct_launcher(compiled) if direct else None
        tail = _signature_tail(jit, self.args, kwargs) if launch is not None else None
        if tail is None:
            return _KnownLaunch(jit, kwargs, config)
        return _KnownLaunch(jit, kwargs, config, launch, tail)


@dataclass(frozen=True)
class _KnownLaunch:
    """A launch seen before: its JIT function and keyword arguments (the autotuner's chosen `config` included) and,
    where it can run without Triton's JIT, its compiled kernel's launcher and the constexpr values that follow the
    positional arguments in the kernel's signature."""
    jit: Any
    kwargs: Dict[str, Any]
    config: Optional[triton.Config]
    launch: Optional[Callable[..., None]] = None
    tail: Tuple[Any, ...] = ()


# A launch's key -> what its first launch found. A seen launch skips Triton's JIT, whose binding and cache lookup
# are most of a launch's host time, and the fused ops are bound by host time at the model's map (docs/kernels.md).
# The key holds what makes Triton compile a different kernel (`_arg_key`), the autotuners' keys (the int
# arguments) and the current device.
_KNOWN_LAUNCHES: Dict[Tuple[Any, ...], _KnownLaunch] = {}


def _current_device() -> int:
    """The CUDA device Triton launches on (the current one, as its JIT reads it); -1 in the interpreter."""
    return -1 if INTERPRET else torch.cuda.current_device()


def _arg_key(arg: Any) -> Any:
    """What a seen launch must match an argument on to reuse its kernel: a tensor's dtype and 16-byte alignment (what
    Triton's JIT specialises a pointer on), a float's type (Triton specialises no float), an int's value, and any
    other value with its type (True == 1, but Triton compiles a bool and the int 1 apart)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.data_ptr() % 16 == 0
    if isinstance(arg, float):
        return float
    return arg if type(arg) is int else (type(arg), arg)


def _signature_tail(jit: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Optional[Tuple[Any, ...]]:
    """The values that follow a launch's positional arguments in its kernel's signature (its constexprs), in order:
    the rest of what Triton's JIT hands the compiled kernel. None where one is not given (a default: keep the JIT)
    or the kernel does not list its parameters."""
    names = kernel_arg_names(jit)
    if names is None:
        return None
    names = names[len(args):]
    return tuple(kwargs[name] for name in names) if all(name in kwargs for name in names) else None


def run_plan(plan: Tuple[List[Launch], Any]) -> Any:
    """Launch a plan's kernels in order and return its outputs: how every fused op runs what a *_plan builds."""
    launches, outputs = plan
    for launch in launches:
        launch()
    return outputs


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on host ints. triton.cdiv is a constexpr function whose wrapper costs host time on every call,
    and a fused op's launches make about a dozen calls: host time bounds the op at the model's map."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 ≥ n ≥ 1, on host ints (as `cdiv`, without triton.next_power_of_2's wrapper)."""
    return 1 << (n - 1).bit_length()


def _channel_blocks(C: int) -> Tuple[int, int, bool]:
    """(BLOCK_C, channel blocks, C fills them: EVEN_C): all channels in one block up to 64 (the model's C)."""
    block_c = max(16, min(next_power_of_2(C), 64))
    return block_c, cdiv(C, block_c), C % block_c == 0


def _cell_mean_warps(grid: int, block_c: int, elem: int) -> int:
    """Warps of the cell mean's 32-token programs, which keep a cell's g² pixel tiles in flight: 4 up to grid 2;
    beyond, enough that each thread holds 16 bytes of a tile (one 128-bit load), at most 16 warps. At grid 4 with
    4 warps, fp32 took 255 registers and spilled."""
    if grid <= 2:
        return 4
    return max(4, min(16, 32 * block_c * elem // (16 * 32)))


def _nhwc(like: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (B, C, ·, ·) tensor stored channels_last: the only layout the kernels address."""
    return torch.empty(shape, device=like.device, dtype=dtype, memory_format=torch.channels_last)


def _rows(count: int, block: str, images: int) -> Callable[[Dict[str, Any]], Tuple[int, int]]:
    return lambda meta: (cdiv(count, meta[block]), images)


def forward_plan(x: torch.Tensor, grid: int, iters: int) -> Tuple[List[Launch], Tuple[torch.Tensor, ...]]:
    """The launches of the fused forward for x (made channels_last), and its outputs (S, A, 1/Z), allocated.

    x may be a meta tensor: `timm_supertoken.ops.compile_kernels` compiles exactly these launches.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    B, C, H, W = x.shape
    h, w = cdiv(H, grid), cdiv(W, grid)
    tokens = [_nhwc(x, (B, C, h, w), torch.float32), _nhwc(x, (B, C, h, w), torch.float32)]
    out = _nhwc(x, (B, C, h, w), x.dtype)
    aff = torch.empty((B, 9, H, W), device=x.device, dtype=torch.float32)
    inv_norm = torch.empty((B, h, w), device=x.device, dtype=torch.float32)
    block_c, channel_blocks, even_c = _channel_blocks(C)
    even_map = H % grid == 0 and W % grid == 0
    launches = [Launch(
        _cell_mean_kernel, _rows(h * w, 'BLOCK_N', B),
        (x, tokens[0], C, H, W, h, w),
        dict(GRID=grid, BLOCK_N=32, BLOCK_C=block_c, EVEN_MAP=even_map,
             num_warps=_cell_mean_warps(grid, block_c, x.element_size()), num_stages=1),
        loops=(channel_blocks,))]
    for step in range(iters):
        last = step == iters - 1
        src, dst = tokens[step % 2], out if last else tokens[(step + 1) % 2]
        launches.append(Launch(
            _affinity_kernel, _rows(H * W, 'BLOCK_M', B),
            (x, src, aff, C, H, W, h, w, C ** -0.5 * math.log2(math.e)),
            dict(GRID=grid, BLOCK_C=block_c, EVEN_C=even_c), loops=(channel_blocks,)))
        launches.append(Launch(
            _aggregate_kernel, _rows(h * w, 'BLOCK_N', B),
            (x, aff, dst, inv_norm, C, H, W, h, w),
            dict(GRID=grid, BLOCK_C=block_c, EVEN_C=even_c, EVEN_MAP=even_map), loops=(channel_blocks, 9),
            label='_aggregate_kernel(output)' if last else ''))
    return launches, (out, aff, inv_norm)


def backward_plan(grad: torch.Tensor, aff: torch.Tensor, inv_norm: torch.Tensor, grid: int
                  ) -> Tuple[List[Launch], torch.Tensor]:
    """The launch of the fused backward for dS (made channels_last), and dX (B, C, H, W) channels_last.

    STViT's rule: A and Z are constants, so S is linear in X and its adjoint is the 9-neighbour gather.
    """
    grad = grad.contiguous(memory_format=torch.channels_last)
    B, C, h, w = grad.shape
    H, W = aff.shape[2], aff.shape[3]
    dx = _nhwc(grad, (B, C, H, W), grad.dtype)
    block_c, channel_blocks, even_c = _channel_blocks(C)
    launch = Launch(
        _backward_kernel, _rows(H * W, 'BLOCK_M', B),
        (grad, aff, inv_norm, dx, C, H, W, h, w),
        dict(GRID=grid, BLOCK_C=block_c, EVEN_C=even_c), loops=(channel_blocks,))
    return [launch], dx


@dataclass(frozen=True)
class LaunchCost:
    """Compulsory DRAM bytes and FLOPs of one launch: its floor is max(bytes / bandwidth, FLOPs / peak)."""
    kernel: str
    launches: int
    bytes: int
    flops: int


def traffic_model(B: int, C: int, H: int, W: int, grid: int, iters: int, elem: int) -> List[LaunchCost]:
    """Compulsory DRAM bytes and FLOPs of each kernel's launch, for a whole batch (each launch counted once).

    Each launch reads its inputs once and writes its outputs once (a neighbour's re-read hits L1/L2); a
    multiply-add is 2 FLOPs. With n = B·H·W pixels, T = B·h·w tokens, e = bytes per element of X: init
    n·C·e + 4T·C bytes; affinity n·C·e + 4T·C + 36n bytes and 18·n·C FLOPs; aggregation n·C·e + 36n + 4T·C
    (+ 4T for 1/Z) bytes and 18·n·C FLOPs; backward T·C·e + 36n + 4T + n·C·e bytes and 18·n·C FLOPs.
    The floor of the whole forward is reading X and writing S once, (n + T)·C·e bytes.
    """
    h, w = -(-H // grid), -(-W // grid)
    n, T = B * H * W, B * h * w
    x, s32, a = n * C * elem, T * C * 4, n * 9 * 4
    return [
        LaunchCost('_cell_mean_kernel', 1, x + s32, n * C),
        LaunchCost('_affinity_kernel', iters, x + s32 + a, 2 * 9 * n * C + 9 * 5 * n),
        LaunchCost('_aggregate_kernel', iters, x + a + s32 + T * 4, 2 * 9 * n * C),
        LaunchCost('_backward_kernel', 1, T * C * elem + a + T * 4 + x, 2 * 9 * n * C),
    ]


def _check_fused(x: torch.Tensor, grid: int) -> None:
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"the Triton super-token backend takes {FUSED_DTYPES}, got {x.dtype}; use backend='reference'")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(
            f'the Triton super-token backend needs a CUDA tensor, got one on {x.device}; on CPU it runs only in '
            "Triton's interpreter (TRITON_INTERPRET=1 set before Triton is imported), else use "
            "backend='reference'")
    if grid > MAX_FUSED_GRID:
        raise ValueError(
            f"the Triton super-token backend supports grid <= {MAX_FUSED_GRID}, got {grid}; use backend='reference'")


@torch.library.custom_op('timm_supertoken::super_token_clustering', mutates_args=())
def _super_token_fwd(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the super tokens S (B, C, h, w) in x's dtype, channels_last, and A (B, 9, H, W), 1/Z (B, h, w) fp32."""
    _check_fused(x, grid)
    return run_plan(forward_plan(x, grid, iters))


@_super_token_fwd.register_fake
def _(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    h, w = (H + grid - 1) // grid, (W + grid - 1) // grid
    return (_nhwc(x, (B, C, h, w), x.dtype), x.new_empty((B, 9, H, W), dtype=torch.float32),
            x.new_empty((B, h, w), dtype=torch.float32))


@torch.library.custom_op('timm_supertoken::super_token_clustering_backward', mutates_args=())
def _super_token_bwd(grad: torch.Tensor, aff: torch.Tensor, inv_norm: torch.Tensor, grid: int) -> torch.Tensor:
    """dX (B, C, H, W) in grad's dtype, channels_last, from dS (B, C, h, w) and the saved A and 1/Z."""
    return run_plan(backward_plan(grad, aff, inv_norm, grid))


@_super_token_bwd.register_fake
def _(grad: torch.Tensor, aff: torch.Tensor, inv_norm: torch.Tensor, grid: int) -> torch.Tensor:
    return _nhwc(grad, (grad.shape[0], grad.shape[1], aff.shape[2], aff.shape[3]), grad.dtype)


def _setup_context(ctx, inputs: Tuple[torch.Tensor, int, int], output: Tuple[torch.Tensor, ...]) -> None:
    _, grid, _ = inputs
    _, aff, inv_norm = output
    ctx.mark_non_differentiable(aff, inv_norm)
    # A and 1/Z never get a gradient: without this autograd filled a zero tensor of each (two kernel launches and
    # a 36 B/pixel write) for the backward to ignore
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(aff, inv_norm)
    ctx.grid = grid


def _backward(ctx, grad: torch.Tensor, _grad_aff: None, _grad_inv_norm: None):
    # S is the only differentiable output, so its gradient is defined whenever autograd calls this
    aff, inv_norm = ctx.saved_tensors
    return _super_token_bwd(grad, aff, inv_norm, ctx.grid), None, None


_super_token_fwd.register_autograd(_backward, setup_context=_setup_context)


class _SuperTokenClustering(torch.autograd.Function):
    """The fused op in eager mode: the same launches as the custom op, without its dispatch.

    The custom op's dispatcher round trip and generated autograd cost most of the op's host time, and the
    op is bound by host time at the model's map (docs/kernels.md). torch.compile and export see the custom op.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, grid: int, iters: int) -> torch.Tensor:
        out, aff, inv_norm = run_plan(forward_plan(x, grid, iters))
        ctx.save_for_backward(aff, inv_norm)
        ctx.grid = grid
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[torch.Tensor, None, None]:
        aff, inv_norm = ctx.saved_tensors
        return run_plan(backward_plan(grad, aff, inv_norm, ctx.grid)), None, None


def super_token_clustering_triton(
        x: torch.Tensor, grid: int = 2, iters: int = 3, validate: bool = True) -> torch.Tensor:
    """Fused super-token clustering, (B, C, H, W) -> (B, C, ⌈H/grid⌉, ⌈W/grid⌉); same maths as the reference.

    `validate` runs the reference path's input checks, the NaN/Inf scan included (one pass over X and a
    host sync; callers that checked already pass False). Half-precision inputs are computed in fp32 and
    the result is cast back to the input dtype. The output is channels_last, like the reference's.
    """
    if validate and not torch.compiler.is_compiling():
        check_super_token_input(x, grid, iters)
        check_finite(x)
    _check_fused(x, grid)
    if torch.compiler.is_compiling():
        return _super_token_fwd(x, grid, iters)[0]
    return _SuperTokenClustering.apply(x, grid, iters)
