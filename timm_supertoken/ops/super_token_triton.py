"""Fused Triton super-token clustering: forward and backward kernels, their launch plan and custom op.

The equations are those of the reference path, `timm_supertoken.functional.super_token`, which is the
specification. For X of shape (B, C, H, W), grid g, h = ⌈H/g⌉, w = ⌈W/g⌉, t iterations:

    S⁰_j  = mean of the real pixels of cell j                                   `_cell_mean_kernel`
    A_pk  = softmax_k(⟨x_p, s_k⟩ · C^-½) over the 3×3 cells k around p's cell     `_affinity_kernel`
    Z_j   = Σ_p A_pj + ε,       s_j ← Σ_p A_pj x_p / Z_j                          `_aggregate_kernel`
    dX_p  = Σ_k A_pk / Z_k · dS_k                                                  `_backward_kernel`

Traffic and FLOPs (n = B·H·W pixels, T = B·h·w ≈ n/g² tokens, e = bytes per element of X; `traffic_model`):
- the op must read X once and write S once: (n + T)·C·e bytes, the floor of the whole forward;
- each launch reads its inputs once and writes its outputs once (neighbours' re-reads hit L1/L2):
  init (n·C·e + 4T·C), affinity (n·C·e + 4T·C + 36n, 18·n·C FLOPs), aggregation (n·C·e + 36n + 4T·C,
  18·n·C FLOPs), backward (T·C·e + 36n + n·C·e, 18·n·C FLOPs): 3-6 FLOPs per byte, where an H100's
  FP32 FFMA balances its HBM at 20 (66.9 TFLOP/s over 3.35 TB/s) and an A100's at 9.6. Every launch is
  memory-bound on plain FFMA, so tensor cores could not shorten it.

Instructions: an SM issues one warp instruction per clock per scheduler (4 per SM), so a launch also takes
at least (warp instructions) / (SMs × 4 × clock); the higher of its two floors bounds it. Triton's lowering of
the first design issued 231 (affinity), 146 (aggregation) and 153 (backward) warp instructions per pixel,
against 18 FFMA's worth of useful work each: at B=256, 56×56×64, the forward issued 0.92 G warp
instructions, 0.88 ms at an H200's issue rate (132 SMs × 4 × 1.98 GHz), and measured 1.17 ms in its
kernels: it was bound by issue, not by bytes (2.6% of HBM bandwidth).

As compiled for sm_90 (`benchmarks/kernel_report.py`, docs/benchmarks.md), at the model's map (B=128,
28×28×64, bf16, channels_last), first config of each kernel; the bytes floor is the launch's traffic at
3.35 TB/s, the issue floor its warp instructions at an H100 SXM5's 1.05 T per second:

    kernel               registers  resident warps/SM  local memory  warp instr/pixel  bytes floor  issue floor
    _cell_mean_kernel        71           28                0              16.7           5.8 µs      1.6 µs
    _affinity_kernel        104           16                0             115.3           6.8 µs     11.1 µs  (×t)
    _aggregate_kernel        64           32                0             113.1           6.9 µs     10.8 µs  (×t)
    _backward_kernel         80           24                0             103.3           5.9 µs      9.9 µs

Every config of every kernel, in fp32/bf16/fp16 and on sm_80 too, uses no local memory and keeps
≥ 16 warps resident (≤ 128 registers); tests/test_kernel_report.py holds that, and the instruction budget
of each stencil.

Why this shape (the numbers come from `benchmarks/kernel_report.py`, which reads the compiled kernels):
- Each pixel's 9 logits and softmax are computed exactly once per iteration (`_affinity_kernel`, one
  row per pixel), written as A (B, 9, H, W) fp32, and each token gathers its ≤ 9g² weighted pixels
  (`_aggregate_kernel`, one row per token). Two launches per iteration is the least the dependence
  allows without recomputation: a token needs the affinities of pixels in the 3×3 cells around it,
  which need the tokens around those cells, i.e. other programs' results of the same iteration.
- The stencils are written for few instructions, since issue is their floor. The nine slots are
  unrolled: each logit is a [rows] vector and the softmax (exp2, logits pre-scaled by log₂e) runs over
  nine of them, with no [rows, 16] slot tile to build, mask and reduce. A token off the grid is read
  at its clamped, in-grid position with no mask and weighted 0 (a -inf logit, then A = 0), so the
  token loads need no predicates and no zero fill. Rows past the map take its last pixel and mask only
  their stores. The aggregation unrolls a cell's g² pixels with clamped addresses and masks only A.
  It saves 1/Z, so the backward multiplies where it divided. `EVEN_C` / `EVEN_MAP` drop the
  channel and border masks where C fills the channel blocks and the grid divides the map.
- It is a 9-point stencil, not a matrix product: the 9 tokens differ for every cell, so tensor cores
  would need a dense [pixels × window] product that is ≥ 75% zeros (a 3×(TW+2)-token window per strip
  of TW cells). The kernels use no tensor cores, in any dtype, and the kernel report checks the SASS
  for it.
- Half-precision inputs are read as they are and converted in registers; all arithmetic is fp32, and
  the running super tokens are fp32 (the reference's compute dtype).
- Rows are pixels or tokens of one image (program axis 1 is the image), so per-row offsets are int32
  and only the image base pointer is 64-bit: registers stay low and inputs beyond 2³¹ elements work.
- The kernels address channels_last (NHWC) tensors only: a row's channels are contiguous, so every
  tile load and store is a coalesced 128-bit access, and one 64-bit base per image plus int32 offsets
  address everything. An NCHW input is converted once (one read and one write of X, ~1/8 of the
  forward's traffic at t = 3); gathering NCHW tiles in place instead costs 160-255 registers per
  thread and 8-12 resident warps (measured with the kernel report). S and dX come out channels_last.
- The whole batch goes through each of the 2t + 1 launches at once. Splitting it into L2-sized chunks
  (so that a chunk's launches re-read X from L2) was measured on an H200 (docs/benchmarks.md): every shape
  took 35-57 µs per launch, so the time followed the launch count (8 chunks at B=256 56×56×64 made 56
  launches and 2.99 ms), while re-reading X from HBM instead of L2 costs about 0.03 ms per launch there.
- The backward is a gather of 9 dS tokens per pixel (no atomics): deterministic.

Block sizes and warps are autotuned per shape among configs that the report proves free of local
memory and at ≥ 16 resident warps per SM on sm_80 and sm_90 (tests/test_kernel_report.py holds
every config to that in CI). A config runs only where its tile fits a per-thread byte budget at the
input's dtype (`_row_autotune`): the unrolled stencils keep all nine token loads in flight, so an fp32
input takes tiles half as tall as a bf16 one. Under Triton's interpreter, or with
$TIMM_SUPERTOKEN_AUTOTUNE=0, only the first fitting config runs: one compile per kernel and shape instead of
one per config (a test suite's many shapes), and on Triton >= 3.2 no timing runs (`_time_config`).

The custom op `timm_supertoken::super_token_clustering` (+ fake and autograd registrations) lets
`torch.compile` keep the fused op in its graph. Eager calls go through `_SuperTokenClustering`, a
`torch.autograd.Function` over the same launches, as in Liger-Kernel-style ops: the custom op's dispatch cost
about two thirds of the op's host time, and on an H200 the stem is bound by host time.
"""
import inspect
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel
from triton.runtime.autotuner import Autotuner
from triton.runtime.interpreter import InterpretedFunction

from ..functional.super_token import FUSED_DTYPES, MAX_FUSED_GRID, NORM_EPS, check_finite, check_super_token_input

__all__ = [
    'super_token_clustering_triton', 'forward_plan', 'backward_plan', 'traffic_model', 'Launch', 'LaunchCost',
    'INTERPRET', 'DIRECT_LAUNCH', 'AUTOTUNED_KERNELS', 'AUTOTUNE_ENV', 'autotuning', 'run_plan',
]

_NORM_EPS: tl.constexpr = tl.constexpr(NORM_EPS)  # the reference's ε, as a constant the kernels can read
AUTOTUNE_ENV = 'TIMM_SUPERTOKEN_AUTOTUNE'


def autotuning() -> bool:
    """Whether a new shape times every fitting config ($TIMM_SUPERTOKEN_AUTOTUNE, default 1) or takes the first (0)."""
    setting = os.environ.get(AUTOTUNE_ENV, '1')
    if setting not in ('0', '1'):
        raise ValueError(f'${AUTOTUNE_ENV} must be 0 or 1, got {setting!r}')
    return setting == '1'


def _times_configs() -> bool:
    """Whether a new shape times its fitting configs (on a GPU, autotuning on) or keeps the first one."""
    return autotuning() and not INTERPRET


def _row_autotune(rows: str, rows_and_warps: Tuple[Tuple[int, int], ...], tile: str, tile_bytes: int
                  ) -> Dict[str, Any]:
    """`triton.autotune` arguments: `rows` per program × warps, keeping the configs whose [rows, BLOCK_C] tile
    of the `tile` argument holds at most `tile_bytes` bytes per thread, and at least 16 where C allows.

    At most the budget, in bytes, so a half-precision input runs tiles twice as tall as fp32 does; at
    least 16 bytes, so that each thread reads its share with 128-bit loads. The interpreter cannot time
    configs (it gives the same numbers for each): it keeps the first that fits.
    """
    configs = [triton.Config({rows: n}, num_warps=warps, num_stages=1) for n, warps in rows_and_warps]

    def fitting(configs: List[triton.Config], named_args: Dict[str, Any], **kwargs) -> List[triton.Config]:
        per_row = named_args[tile].element_size() * kwargs['BLOCK_C']
        within = [c for c in configs if c.kwargs[rows] * per_row <= tile_bytes * c.num_warps * 32]
        fit = [c for c in within if c.kwargs[rows] * per_row >= 16 * c.num_warps * 32] or within
        return fit if _times_configs() else fit[:1]

    arguments = dict(configs=configs, key=['C', 'H', 'W', 'GRID'], prune_configs_by={'early_config_prune': fitting})
    if 'do_bench' in inspect.signature(triton.autotune).parameters:  # Triton >= 3.2
        arguments['do_bench'] = _time_config
    return arguments


def _time_config(kernel_call: Callable[[], None], quantiles: Tuple[float, ...]) -> List[float]:
    """The autotuner's timing of a config, skipped where `fitting` keeps one config: Triton 3.6 and older time
    even a lone config (about 0.1 s of launches and a 256 MB L2 flush per kernel and new shape)."""
    if _times_configs():
        return triton.runtime.driver.active.get_benchmarker()(kernel_call, quantiles=quantiles)
    return [0.0] * len(quantiles)


# The loaded tiles, their fp32 products and the partial sums stay in registers (≤ 128 per thread). The
# affinity's X tile holds ≤ 32 bytes per thread (two 128-bit loads) and the token kernels' ≤ 64. The
# backward's nine dS tiles are all in flight at once, so its tile holds 16: at 32, fp32 on sm_90 takes 164-166
# registers (8-12 resident warps) and spills 104 bytes with 64 rows on 16 warps.
_TOKEN_AUTOTUNE = _row_autotune('BLOCK_N', ((32, 4), (16, 2), (32, 8), (64, 8)), 'x_ptr', 64)
_AFFINITY_AUTOTUNE = _row_autotune('BLOCK_M', ((32, 4), (64, 8), (32, 8), (16, 4)), 'x_ptr', 32)
_BACKWARD_AUTOTUNE = _row_autotune(
    'BLOCK_M', ((32, 8), (16, 4), (8, 2), (64, 16), (16, 8), (8, 4), (32, 16)), 'grad_ptr', 16)


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
INTERPRET: bool = isinstance(_cell_mean_kernel, InterpretedFunction)


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
        if known.compiled is None or _launch_hooks_set():
            known.jit[self.grid](*self.args, **known.kwargs)
            return
        grid, compiled = self.grid(known.kwargs), known.compiled
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     triton.runtime.driver.active.get_current_stream(key[1]), compiled.function,
                     compiled.packed_metadata, None, None, None, *self.args, *known.tail)

    def _through_triton(self) -> '_KnownLaunch':
        """The first launch of its kind: Triton's JIT compiles or finds the kernel, an autotuner picks its config."""
        kernel = self.kernel
        compiled = kernel[self.grid](*self.args, **self.constexprs)
        config = kernel.best_config if isinstance(kernel, Autotuner) else None
        jit = kernel if config is None else kernel.fn
        kwargs = self.constexprs if config is None else {**self.constexprs, **config.all_kwargs()}
        direct = DIRECT_LAUNCH and isinstance(compiled, CompiledKernel) and (config is None or config.pre_hook is None)
        tail = _signature_tail(jit, self.args, kwargs) if direct else None
        if tail is None:
            return _KnownLaunch(jit, kwargs, config)
        return _KnownLaunch(jit, kwargs, config, compiled, tail)


@dataclass(frozen=True)
class _KnownLaunch:
    """A launch seen before: its JIT function and keyword arguments (the autotuner's chosen `config` included) and,
    where it can run without Triton's JIT, its compiled kernel and the constexpr values that follow the positional
    arguments in the kernel's signature."""
    jit: Any
    kwargs: Dict[str, Any]
    config: Optional[triton.Config]
    compiled: Optional[CompiledKernel] = None
    tail: Tuple[Any, ...] = ()


# A launch's key -> what its first launch found. A seen launch skips Triton's JIT: on an H200 host with Triton
# 3.6, the JIT took 19 µs to launch a 3-argument kernel and its compiled kernel's own launcher 7.6 µs, and the
# fused ops are bound by host time at the model's map (docs/benchmarks.md). The key holds what makes Triton
# compile a different kernel (`_arg_key`), the autotuners' keys (the int arguments) and the current device.
_KNOWN_LAUNCHES: Dict[Tuple[Any, ...], _KnownLaunch] = {}


def _triton_minor() -> Tuple[int, ...]:
    return tuple(int(v) for v in re.match(r'(\d+)\.(\d+)', triton.__version__).groups())


# The Tritons whose compiled kernels are launched directly: `CompiledKernel.run(gx, gy, gz, stream, function,
# packed_metadata, launch_metadata, enter_hook, exit_hook, *every argument in signature order, constexprs
# included)` is the call their JIT makes, read in the source of 3.6-3.8 and run on an H200 with 3.6. Others, and
# the interpreter (which compiles nothing), go through the JIT at every launch.
DIRECT_LAUNCH_TRITON: bool = (3, 6) <= _triton_minor() <= (3, 8)
DIRECT_LAUNCH: bool = DIRECT_LAUNCH_TRITON and not INTERPRET


def _current_device() -> int:
    """The CUDA device Triton launches on (the current one, as its JIT reads it); -1 where nothing is compiled."""
    return torch.cuda.current_device() if DIRECT_LAUNCH else -1


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
    the rest of what Triton's JIT hands the compiled kernel. None where one is not given (a default: keep the JIT)."""
    names = jit.arg_names[len(args):]
    return tuple(kwargs[name] for name in names) if all(name in kwargs for name in names) else None


def _launch_hooks_set() -> bool:
    """Whether something (a profiler such as Triton's proton) hooks Triton's launches: those launches keep its JIT.
    A hook is a function or None (Triton 3.6), or a chain of them that may be empty (3.8)."""
    runtime = triton.knobs.runtime
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, 'calls', enter)) or bool(getattr(leave, 'calls', leave))


def run_plan(plan: Tuple[List[Launch], Any]) -> Any:
    """Launch a plan's kernels in order and return its outputs: how every fused op runs what a *_plan builds."""
    launches, outputs = plan
    for launch in launches:
        launch()
    return outputs


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ on host ints. triton.cdiv is a constexpr function whose wrapper costs ~3 µs a call (Triton 3.6-3.8),
    and a fused op's launches make about a dozen calls: host time, which bounds the op at the model's map."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 ≥ n ≥ 1, on host ints (as `cdiv`, without triton.next_power_of_2's wrapper)."""
    return 1 << (n - 1).bit_length()


def _channel_blocks(C: int) -> Tuple[int, int, bool]:
    """(BLOCK_C, channel blocks, C fills them: EVEN_C): all channels in one block up to 64 (the model's C)."""
    block_c = max(16, min(next_power_of_2(C), 64))
    return block_c, cdiv(C, block_c), C % block_c == 0


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
        dict(GRID=grid, BLOCK_N=32, BLOCK_C=block_c, EVEN_MAP=even_map, num_warps=4, num_stages=1),
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
    """The module docstring's traffic/FLOP model, per kernel (for a whole batch, each launch counted once).

    Each launch reads its inputs once and writes its outputs once (a neighbour's re-read hits L1/L2); a
    multiply-add is 2 FLOPs. n = B·H·W pixels, T = B·h·w tokens, e = bytes per element of X.
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

    The custom op's dispatcher round trip and generated autograd were about two thirds of the op's host time
    (with the launches stubbed out, on the CPU); the stem is bound by host time on an H200 (docs/benchmarks.md).
    torch.compile and export see the custom op.
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
