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

As compiled for sm_90 (`benchmarks/kernel_report.py`, docs/benchmarks.md), at the model's map (B=128,
28×28×64, bf16, channels_last), first config of each kernel; the floor is the launch's bytes at 3.35 TB/s:

    kernel               registers  resident warps/SM  local memory  MB per launch  floor
    _cell_mean_kernel        69           28                0            19.3       5.8 µs
    _affinity_kernel         71           28                0            22.9       6.8 µs  (×t)
    _aggregate_kernel        48           40                0            23.0       6.9 µs  (×t)
    _backward_kernel         48           40                0            19.8       5.9 µs

Every config of every kernel, in fp32/bf16/fp16 and on sm_80 too, uses no local memory and keeps
≥ 16 warps resident (fp32 is the tightest: ≤ 104 registers); tests/test_kernel_report.py holds that.

Why this shape (the numbers come from `benchmarks/kernel_report.py`, which reads the compiled kernels):
- Each pixel's 9 logits and softmax are computed exactly once per iteration (`_affinity_kernel`, one
  row per pixel), written as A (B, 9, H, W) fp32, and each token gathers its ≤ 9g² weighted pixels
  (`_aggregate_kernel`, one row per token). Two launches per iteration is the least the dependence
  allows without recomputation: a token needs the affinities of pixels in the 3×3 cells around it,
  which need the tokens around those cells, i.e. other programs' results of the same iteration.
- It is a 9-point stencil, not a matrix product: the 9 tokens differ for every cell, so tensor cores
  would need a dense [pixels × window] product that is ≥ 75% zeros (a 3×(TW+2)-token window per strip
  of TW cells), for launches that are memory-bound on FFMA already (above). The kernels use no tensor
  cores, in any dtype, and the kernel report checks the SASS for it.
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
  Unchunked, the same forward took 1.26 ms, 1.17 ms of it in kernels: it is now bound by the kernels,
  at ~3.5× the 7-launch HBM floor. What the floor leaves out is the gathers: a pixel row of
  `_affinity_kernel` loads its 9 fp32 tokens (9 × 4C bytes, from L1/L2) for C·e bytes of X, and each of
  the g² pixels of a cell loads the same 9 again; `_aggregate_kernel` loads each pixel for 9 tokens.
- The backward is a gather of 9 dS tokens per pixel (no atomics): deterministic.

Block sizes and warps are autotuned per shape among configs that the report proves free of local
memory and at ≥ 16 resident warps per SM on sm_80 and sm_90 (tests/test_kernel_report.py holds
every config to that in CI). Under Triton's interpreter only the first config of each list runs.

The custom op `timm_supertoken::super_token_clustering` (+ fake and autograd registrations) lets
`torch.compile` keep the fused op in its graph; `register_autograd` plays the role of the
`torch.autograd.Function` of Liger-Kernel-style ops.
"""
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from ..functional.super_token import FUSED_DTYPES, MAX_FUSED_GRID, NORM_EPS, check_finite, check_super_token_input

__all__ = [
    'super_token_clustering_triton', 'forward_plan', 'backward_plan', 'traffic_model', 'Launch', 'LaunchCost',
    'INTERPRET',
]

_NORM_EPS: tl.constexpr = tl.constexpr(NORM_EPS)  # the reference's ε, as a constant the kernels can read


def _interpreter_prune(configs: List[triton.Config], named_args: Dict[str, Any], **kwargs) -> List[triton.Config]:
    """The interpreter cannot time configs (and gives the same numbers for each): keep the first."""
    return configs[:1] if INTERPRET else configs


def _row_configs(name: str) -> List[triton.Config]:
    """Rows per program × warps for a row kernel; the first is the interpreter's.

    Each keeps a [rows, BLOCK_C ≤ 64] tile at ≤ 16 elements per thread (two 128-bit loads in bf16), so
    the loaded tiles, their fp32 products and the partial sums stay in registers at ≤ 128 per thread.
    """
    return [triton.Config({name: rows}, num_warps=warps, num_stages=1)
            for rows, warps in ((32, 4), (16, 2), (32, 8), (64, 8))]


_PIXEL_CONFIGS = _row_configs('BLOCK_M')
_TOKEN_CONFIGS = _row_configs('BLOCK_N')
_AUTOTUNE = dict(key=['C', 'H', 'W'], prune_configs_by={'early_config_prune': _interpreter_prune})


@triton.jit
def _token_rows(h, w, BLOCK_N: tl.constexpr):
    """This program's tokens of image program_id(1): (image, token index n, n in range, cell row, cell column)."""
    b = tl.program_id(1).to(tl.int64)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    return b, n, n < h * w, n // w, n % w


@triton.jit
def _pixel_rows(H, W, GRID: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's pixels of image program_id(1): (image, pixel index m, m in range, its cell's row, column)."""
    b = tl.program_id(1).to(tl.int64)
    m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    return b, m, m < H * W, (m // W) // GRID, (m % W) // GRID


@triton.jit
def _neighbour(i, j, kk, row_ok, h, w):
    """Cell (i, j)'s neighbour in slot kk = (dy + 1)·3 + (dx + 1): (row, column, on the grid and in a real row)."""
    ti = i + (kk // 3 - 1)
    tj = j + (kk % 3 - 1)
    return ti, tj, row_ok & (ti >= 0) & (ti < h) & (tj >= 0) & (tj < w)


@triton.jit
def _cell_pixel(y0, x0, q, cell_ok, H, W, GRID: tl.constexpr):
    """Pixel q (row-major) of the cell starting at pixel (y0, x0): (y, x, in the map: border cells may be partial)."""
    y = y0 + q // GRID
    x = x0 + q % GRID
    return y, x, cell_ok & (y < H) & (x < W)


@triton.jit
def _cell_mean_kernel(
        x_ptr, tok_ptr,
        C, H, W, h, w,
        GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
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
            y, x, ok = _cell_pixel(i * GRID, j * GRID, q, row_ok, H, W, GRID)
            acc += tl.load(x_base + ((y * W + x) * C)[:, None] + c[None, :],
                           mask=ok[:, None] & cm[None, :], other=0.0).to(tl.float32)
        tl.store(tok_ptr + b * h * w * C + (n * C)[:, None] + c[None, :], acc / count[:, None],
                 mask=row_ok[:, None] & cm[None, :])


@triton.autotune(configs=_PIXEL_CONFIGS, **_AUTOTUNE)
@triton.jit
def _affinity_kernel(
        x_ptr, tok_ptr, aff_ptr,
        C, H, W, h, w, scale,
        GRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """A_pk = softmax_k(⟨x_p, s_k⟩·scale) over the 3×3 tokens k around p's cell, into aff (B, 9, H, W).

    Rows: pixels of image program_id(1). Slot k = (dy + 1)·3 + (dx + 1) for the token at cell offset
    (dy, dx); slots off the grid get A = 0. The 9 logits live in one [BLOCK_M, 16] tile.
    """
    b, m, row_ok, i, j = _pixel_rows(H, W, GRID, BLOCK_M)
    k = tl.arange(0, 16)
    slot_ok = (k[None, :] < 9) & row_ok[:, None] & (i[:, None] + k[None, :] // 3 >= 1) \
        & (i[:, None] + k[None, :] // 3 <= h) & (j[:, None] + k[None, :] % 3 >= 1) & (j[:, None] + k[None, :] % 3 <= w)
    x_base = x_ptr + b * H * W * C
    t_base = tok_ptr + b * h * w * C
    logits = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        xt = tl.load(x_base + (m * C)[:, None] + c[None, :], mask=row_ok[:, None] & cm[None, :],
                     other=0.0).to(tl.float32)
        for kk in range(9):
            ti, tj, ok = _neighbour(i, j, kk, row_ok, h, w)
            tok = tl.load(t_base + ((ti * w + tj) * C)[:, None] + c[None, :],
                          mask=ok[:, None] & cm[None, :], other=0.0)
            logits += tl.where(k[None, :] == kk, tl.sum(xt * tok, axis=1)[:, None], 0.0)
    logits = tl.where(slot_ok, logits * scale, float('-inf'))
    row_max = tl.where(row_ok, tl.max(logits, axis=1), 0.0)  # rows past the map: keep exp() NaN-free
    e = tl.where(slot_ok, tl.exp(logits - row_max[:, None]), 0.0)
    den = tl.sum(e, axis=1)
    aff = e / tl.where(den > 0, den, 1.0)[:, None]  # a real pixel always sees its own cell: den ≥ 1
    tl.store(aff_ptr + b * 9 * H * W + k[None, :] * (H * W) + m[:, None], aff,
             mask=(k[None, :] < 9) & row_ok[:, None])


@triton.autotune(configs=_TOKEN_CONFIGS, **_AUTOTUNE)
@triton.jit
def _aggregate_kernel(
        x_ptr, aff_ptr, out_ptr, norm_ptr,
        C, H, W, h, w,
        GRID: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Z_j = Σ_p A_pj + ε and s_j = Σ_p A_pj x_p / Z_j over the pixels p of the 3×3 cells around j.

    Rows: tokens of image program_id(1). The pixel in cell j + (dy, dx) saw token j in its slot 8 - k,
    where k is that cell's slot seen from j. Writes s to out (fp32 tokens, or the output's dtype) and Z to norm.
    """
    b, n, row_ok, i, j = _token_rows(h, w, BLOCK_N)
    x_base = x_ptr + b * H * W * C
    a_base = aff_ptr + b * 9 * H * W
    norm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_N, BLOCK_C), dtype=tl.float32)
        norm = tl.zeros((BLOCK_N,), dtype=tl.float32)  # the same in every channel block: cheaper than a pass
        for kk in range(9):
            cy = (i + kk // 3 - 1) * GRID  # first pixel of the neighbour cell
            cx = (j + kk % 3 - 1) * GRID
            cell_ok = row_ok & (cy >= 0) & (cy < H) & (cx >= 0) & (cx < W)
            a_kk = a_base + (8 - kk) * (H * W)
            for q in range(GRID * GRID):
                y, x, ok = _cell_pixel(cy, cx, q, cell_ok, H, W, GRID)
                a = tl.load(a_kk + y * W + x, mask=ok, other=0.0)
                xt = tl.load(x_base + ((y * W + x) * C)[:, None] + c[None, :], mask=ok[:, None] & cm[None, :],
                             other=0.0)
                acc += a[:, None] * xt.to(tl.float32)
                norm += a
        norm += _NORM_EPS
        tl.store(out_ptr + b * h * w * C + (n * C)[:, None] + c[None, :], acc / norm[:, None],
                 mask=row_ok[:, None] & cm[None, :])
    tl.store(norm_ptr + b * h * w + n, norm, mask=row_ok)


@triton.autotune(configs=_PIXEL_CONFIGS, **_AUTOTUNE)
@triton.jit
def _backward_kernel(
        grad_ptr, aff_ptr, norm_ptr, dx_ptr,
        C, H, W, h, w,
        GRID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dX_p = Σ_k A_pk / Z_k · dS_k over the 3×3 tokens k around p's cell. Rows: pixels of image program_id(1)."""
    b, m, row_ok, i, j = _pixel_rows(H, W, GRID, BLOCK_M)
    g_base = grad_ptr + b * h * w * C
    a_base = aff_ptr + b * 9 * H * W
    n_base = norm_ptr + b * h * w
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for kk in range(9):
            ti, tj, ok = _neighbour(i, j, kk, row_ok, h, w)
            weight = tl.load(a_base + kk * (H * W) + m, mask=ok, other=0.0) \
                / tl.load(n_base + ti * w + tj, mask=ok, other=1.0)
            g = tl.load(g_base + ((ti * w + tj) * C)[:, None] + c[None, :],
                        mask=ok[:, None] & cm[None, :], other=0.0)
            acc += weight[:, None] * g.to(tl.float32)
        tl.store(dx_ptr + b * H * W * C + (m * C)[:, None] + c[None, :], acc, mask=row_ok[:, None] & cm[None, :])


# the kernels were built as interpreter functions iff TRITON_INTERPRET=1 was set when Triton loaded
INTERPRET: bool = isinstance(_cell_mean_kernel, InterpretedFunction)


@dataclass(frozen=True)
class Launch:
    """One kernel launch of the fused op: what both the launcher and `compile_kernels` read.

    `grid` maps the chosen meta-parameters (BLOCK_M / BLOCK_N of an autotuned kernel) to the program grid.
    `label` names the launch where one kernel is compiled twice with different argument types.
    """
    kernel: Any
    grid: Callable[[Dict[str, Any]], Tuple[int, ...]]
    args: Tuple[Any, ...]
    constexprs: Dict[str, Any] = field(default_factory=dict)
    label: str = ''

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.constexprs)


def _block_c(C: int) -> int:
    """Channels per block: all of them up to 64 (the model's C), so the common case is one pass."""
    return max(16, min(triton.next_power_of_2(C), 64))


def _nhwc(like: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised (B, C, ·, ·) tensor stored channels_last: the only layout the kernels address."""
    return torch.empty(shape, device=like.device, dtype=dtype, memory_format=torch.channels_last)


def _rows(count: int, block: str, images: int) -> Callable[[Dict[str, Any]], Tuple[int, int]]:
    return lambda meta: (triton.cdiv(count, meta[block]), images)


def forward_plan(x: torch.Tensor, grid: int, iters: int) -> Tuple[List[Launch], Tuple[torch.Tensor, ...]]:
    """The launches of the fused forward for x (made channels_last), and its outputs (S, A, Z), allocated.

    x may be a meta tensor: `timm_supertoken.ops.compile_kernels` compiles exactly these launches.
    """
    x = x.contiguous(memory_format=torch.channels_last)
    B, C, H, W = x.shape
    h, w = triton.cdiv(H, grid), triton.cdiv(W, grid)
    tokens = [_nhwc(x, (B, C, h, w), torch.float32), _nhwc(x, (B, C, h, w), torch.float32)]
    out = _nhwc(x, (B, C, h, w), x.dtype)
    aff = torch.empty((B, 9, H, W), device=x.device, dtype=torch.float32)
    norm = torch.empty((B, h, w), device=x.device, dtype=torch.float32)
    block_c = _block_c(C)
    launches = [Launch(
        _cell_mean_kernel, _rows(h * w, 'BLOCK_N', B),
        (x, tokens[0], C, H, W, h, w),
        dict(GRID=grid, BLOCK_N=32, BLOCK_C=block_c, num_warps=4, num_stages=1))]
    for step in range(iters):
        last = step == iters - 1
        src, dst = tokens[step % 2], out if last else tokens[(step + 1) % 2]
        launches.append(Launch(
            _affinity_kernel, _rows(H * W, 'BLOCK_M', B),
            (x, src, aff, C, H, W, h, w, C ** -0.5),
            dict(GRID=grid, BLOCK_C=block_c)))
        launches.append(Launch(
            _aggregate_kernel, _rows(h * w, 'BLOCK_N', B),
            (x, aff, dst, norm, C, H, W, h, w),
            dict(GRID=grid, BLOCK_C=block_c), label='_aggregate_kernel(output)' if last else ''))
    return launches, (out, aff, norm)


def backward_plan(grad: torch.Tensor, aff: torch.Tensor, norm: torch.Tensor, grid: int
                  ) -> Tuple[List[Launch], torch.Tensor]:
    """The launch of the fused backward for dS (made channels_last), and dX (B, C, H, W) channels_last."""
    grad = grad.contiguous(memory_format=torch.channels_last)
    B, C, h, w = grad.shape
    H, W = aff.shape[2], aff.shape[3]
    dx = _nhwc(grad, (B, C, H, W), grad.dtype)
    launch = Launch(
        _backward_kernel, _rows(H * W, 'BLOCK_M', B),
        (grad, aff, norm, dx, C, H, W, h, w),
        dict(GRID=grid, BLOCK_C=_block_c(C)))
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
    """Returns the super tokens S (B, C, h, w) in x's dtype, channels_last, and A (B, 9, H, W), Z (B, h, w) fp32."""
    _check_fused(x, grid)
    launches, outputs = forward_plan(x, grid, iters)
    for launch in launches:
        launch()
    return outputs


@_super_token_fwd.register_fake
def _(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    h, w = (H + grid - 1) // grid, (W + grid - 1) // grid
    return (_nhwc(x, (B, C, h, w), x.dtype), x.new_empty((B, 9, H, W), dtype=torch.float32),
            x.new_empty((B, h, w), dtype=torch.float32))


@torch.library.custom_op('timm_supertoken::super_token_clustering_backward', mutates_args=())
def _super_token_bwd(grad: torch.Tensor, aff: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    """dX (B, C, H, W) in grad's dtype, channels_last, from dS (B, C, h, w) and the saved A and Z."""
    launches, dx = backward_plan(grad, aff, norm, grid)
    for launch in launches:
        launch()
    return dx


@_super_token_bwd.register_fake
def _(grad: torch.Tensor, aff: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    return _nhwc(grad, (grad.shape[0], grad.shape[1], aff.shape[2], aff.shape[3]), grad.dtype)


def _setup_context(ctx, inputs: Tuple[torch.Tensor, int, int], output: Tuple[torch.Tensor, ...]) -> None:
    _, grid, _ = inputs
    _, aff, norm = output
    ctx.mark_non_differentiable(aff, norm)
    ctx.save_for_backward(aff, norm)
    ctx.grid = grid


def _backward(ctx, grad: torch.Tensor, _grad_aff: torch.Tensor, _grad_norm: torch.Tensor):
    # STViT's rule: A and Z are constants, so S is linear in X and its adjoint is the 9-neighbour gather
    aff, norm = ctx.saved_tensors
    return _super_token_bwd(grad, aff, norm, ctx.grid), None, None


_super_token_fwd.register_autograd(_backward, setup_context=_setup_context)


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
    return _super_token_fwd(x, grid, iters)[0]
