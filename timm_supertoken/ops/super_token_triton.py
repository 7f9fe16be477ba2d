"""Fused Triton super-token clustering (DESIGN.md §2): forward and backward kernels and their custom op.

The equations are those of the reference path, `timm_supertoken.layers.super_token`, which is the
specification. For X of shape (B, C, H, W), grid g, h = ⌈H/g⌉, w = ⌈W/g⌉:

    S⁰_j  = mean of the real pixels of cell j                                      (init kernel)
    a_pj  = ⟨x_p, s_j⟩ · C^-½   for the 9 cells j around p's cell (off-grid: -inf)
    A_pj  = softmax_j(a_pj)   (0 for padded pixels)                               (iteration kernel,
    Z_j   = Σ_p A_pj + 1e-12,   s_j ← Σ_p A_pj x_p / Z_j                           once per iteration)
    dX_p  = Σ_{j∈N(p)} A_pj / Z_j · dS_j                                           (backward kernel)

Kernel design:
- one program per super token j (grid B·h·w) for the init and iteration kernels. An iteration program
  loads the pixels of the 3×3 cells around j as one [NPIX, BLOCK_C] tile (NPIX = next_pow2(9g²)) and the
  25 super tokens of the 5×5 window around j as [32, BLOCK_C], so the logits of every pixel to every
  token of the window are one `tl.dot` per channel block; each pixel row is then masked to its own
  3×3 neighbourhood and soft-maxed. Column j of that softmax is A_pj, which is all the program needs
  to aggregate s_j: no program writes what another reads, so no atomics and no partial-sum buffers,
  at the price of recomputing each pixel's logits in the 9 programs around it (compute, not traffic:
  the 3×3 tile is re-read from L2).
- one launch per iteration, ping-ponging the (B, h, w, C) fp32 super tokens through global memory
  (the neighbours' updated tokens are needed, i.e. a grid-wide barrier). The last launch writes the
  output (B, C, h, w) in the input dtype, Z, and the full softmax rows A (B, H, W, 9) of the pixels of
  each program's own cell (every pixel has exactly one own cell: disjoint writes).
- backward: one program per (batch, pixel row, BLOCK_W pixels), dX_p gathered from the ≤9 dS_j and
  A_pj / Z_j: deterministic, no atomics.
Everything accumulates in fp32 (`tl.dot` with input_precision="ieee", no TF32, to match the reference).
Any input strides are handled (NCHW or channels_last), so no copy of X is made.

The custom op `timm_supertoken::super_token_clustering` (+ fake and autograd registrations) lets
`torch.compile` keep the fused op in its graph; `register_autograd` plays the role of the
`torch.autograd.Function` of Liger-Kernel-style ops.
"""
from typing import Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

__all__ = ['super_token_clustering_triton', 'INTERPRET', 'MAX_FUSED_GRID', 'FUSED_DTYPES']

# the 3×3 cell tile of a g=4 token is 144 pixels -> a [256, BLOCK_C] tile; beyond that it no longer fits
MAX_FUSED_GRID = 4
# register budget of the [NPIX, BLOCK_C] pixel tile (fp32 elements per program)
_TILE_ELEMS = 8192
_WINDOW = 32  # the 5×5 token window around a super token, padded to a power of two


@triton.jit
def _init_kernel(
        x_ptr, s_ptr,
        C, H, W, h, w,
        sxb, sxc, sxh, sxw,
        GRID: tl.constexpr, CELL: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """S⁰_j = mean of the real pixels of cell j -> s (B, h, w, C) fp32. One program per super token."""
    pid = tl.program_id(0)
    b = (pid // (h * w)).to(tl.int64)
    i = (pid // w) % h
    j = pid % w
    p = tl.arange(0, CELL)
    y = i * GRID + p // GRID
    x = j * GRID + p % GRID
    real = (p < GRID * GRID) & (y < H) & (x < W)
    count = tl.sum(real.to(tl.float32), axis=0)  # border cells hold fewer pixels
    x_off = b * sxb + y * sxh + x * sxw
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        xt = tl.load(x_ptr + x_off[:, None] + c[None, :] * sxc, mask=real[:, None] & cm[None, :], other=0.0)
        tl.store(s_ptr + pid.to(tl.int64) * C + c, tl.sum(xt.to(tl.float32), axis=0) / count, mask=cm)


@triton.jit
def _iteration_kernel(
        x_ptr, s_in_ptr, s_out_ptr, norm_ptr, aff_ptr,
        C, H, W, h, w, scale,
        sxb, sxc, sxh, sxw,
        sob, soc, soh, sow,
        GRID: tl.constexpr, NPIX: tl.constexpr, WINDOW: tl.constexpr, BLOCK_C: tl.constexpr,
        SAVE: tl.constexpr,
):
    """One clustering iteration for super token j: A_pj over the 3×3 cells around j, s_j = Σ_p A_pj x_p / Z_j.

    Reads the tokens s_in (B, h, w, C) fp32, writes s_j to s_out with strides (so, ...). With SAVE (the
    last iteration) also writes Z_j to norm (B, h, w) and the 9 affinities of the pixels of cell j to
    aff (B, H, W, 9), for the backward pass.
    """
    pid = tl.program_id(0)
    b = (pid // (h * w)).to(tl.int64)
    i = (pid // w) % h
    j = pid % w

    # pixel p of the 3g×3g block of cells around j, and the offset (cy, cx) ∈ {-1, 0, 1}² of its cell
    p = tl.arange(0, NPIX)
    ry = p // (3 * GRID)
    rx = p % (3 * GRID)
    cy = ry // GRID - 1
    cx = rx // GRID - 1
    y = (i - 1) * GRID + ry
    x = (j - 1) * GRID + rx
    real = (p < 9 * GRID * GRID) & (y >= 0) & (y < H) & (x >= 0) & (x < W)
    x_off = b * sxb + y * sxh + x * sxw

    # token t of the 5×5 window around j, at offset (ty, tx) ∈ {-2..2}²
    t = tl.arange(0, WINDOW)
    ty = t // 5 - 2
    tx = t % 5 - 2
    tok_ok = (t < 25) & (i + ty >= 0) & (i + ty < h) & (j + tx >= 0) & (j + tx < w)
    tok_off = ((b * h + i + ty) * w + j + tx) * C

    logits = tl.zeros((NPIX, WINDOW), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        xt = tl.load(x_ptr + x_off[:, None] + c[None, :] * sxc, mask=real[:, None] & cm[None, :], other=0.0)
        tok = tl.load(s_in_ptr + tok_off[:, None] + c[None, :], mask=tok_ok[:, None] & cm[None, :], other=0.0)
        logits += tl.dot(xt.to(tl.float32), tl.trans(tok), input_precision='ieee')

    # each pixel sees only the 3×3 tokens around its own cell, and only those on the grid
    near = (tl.abs(ty[None, :] - cy[:, None]) <= 1) & (tl.abs(tx[None, :] - cx[:, None]) <= 1)
    valid = near & tok_ok[None, :] & real[:, None]
    logits = tl.where(valid, logits * scale, float('-inf'))
    row_max = tl.max(logits, axis=1)
    row_max = tl.where(row_max == float('-inf'), 0.0, row_max)  # padded rows: keep exp() NaN-free
    e = tl.where(valid, tl.exp(logits - row_max[:, None]), 0.0)
    den = tl.sum(e, axis=1)
    aff = e / tl.where(den > 0, den, 1.0)[:, None]  # real pixels always see their own cell: den ≥ 1
    a_j = tl.sum(tl.where(t[None, :] == 12, aff, 0.0), axis=1)  # column of the centre token j
    norm = tl.sum(a_j, axis=0) + 1e-12

    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        xt = tl.load(x_ptr + x_off[:, None] + c[None, :] * sxc, mask=real[:, None] & cm[None, :], other=0.0)
        s = tl.sum(a_j[:, None] * xt.to(tl.float32), axis=0) / norm
        tl.store(s_out_ptr + b * sob + i * soh + j * sow + c * soc, s, mask=cm)

    if SAVE:
        tl.store(norm_ptr + pid, norm)
        # the pixels of cell j store their whole 3×3 softmax row, slot k = (ty + 1)·3 + (tx + 1)
        own = real & (cy == 0) & (cx == 0)
        centre = (tl.abs(ty) <= 1) & (tl.abs(tx) <= 1)
        k = (ty + 1) * 3 + tx + 1
        a_off = ((b * H + y) * W + x) * 9
        tl.store(aff_ptr + a_off[:, None] + k[None, :], aff, mask=own[:, None] & centre[None, :])


@triton.jit
def _backward_kernel(
        grad_ptr, aff_ptr, norm_ptr, dx_ptr,
        C, H, W, h, w,
        sgb, sgc, sgh, sgw,
        sdb, sdc, sdh, sdw,
        GRID: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dX_p = Σ_{j∈N(p)} A_pj / Z_j · dS_j, gathered per pixel. One program per (b, y, BLOCK_W pixels of row y)."""
    pid = tl.program_id(0)
    n_tiles = (W + BLOCK_W - 1) // BLOCK_W
    b = (pid // (H * n_tiles)).to(tl.int64)
    y = (pid // n_tiles) % H
    x = (pid % n_tiles) * BLOCK_W + tl.arange(0, BLOCK_W)
    pm = x < W
    # the cell row as a vector: Triton's interpreter cannot AND a scalar condition into a vector mask
    i = (y + 0 * x) // GRID
    jx = x // GRID
    a_off = ((b * H + y) * W + x) * 9
    for c0 in range(0, C, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cm = c < C
        acc = tl.zeros((BLOCK_W, BLOCK_C), dtype=tl.float32)
        for k in tl.static_range(9):
            ti = i + k // 3 - 1
            tj = jx + k % 3 - 1
            ok = pm & (ti >= 0) & (ti < h) & (tj >= 0) & (tj < w)
            weight = tl.load(aff_ptr + a_off + k, mask=ok, other=0.0) / \
                tl.load(norm_ptr + (b * h + ti) * w + tj, mask=ok, other=1.0)
            g = tl.load(grad_ptr + b * sgb + (ti * sgh + tj * sgw)[:, None] + c[None, :] * sgc,
                        mask=ok[:, None] & cm[None, :], other=0.0)
            acc += weight[:, None] * g.to(tl.float32)
        tl.store(dx_ptr + b * sdb + y * sdh + x[:, None] * sdw + c[None, :] * sdc, acc, mask=pm[:, None] & cm[None, :])


# the kernels were built as interpreter functions iff TRITON_INTERPRET=1 was set when this module loaded
INTERPRET: bool = isinstance(_iteration_kernel, InterpretedFunction)


FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_fused(x: torch.Tensor, grid: int) -> None:
    if x.dtype not in FUSED_DTYPES:
        # the kernels accumulate in fp32: float64 would silently lose precision
        raise TypeError(f"the Triton super-token backend takes {FUSED_DTYPES}, got {x.dtype}; use backend='reference'")
    if not (x.is_cuda or INTERPRET):
        raise RuntimeError(
            f'the Triton super-token backend needs a CUDA tensor, got one on {x.device}; on CPU it runs only in '
            "Triton's interpreter (TRITON_INTERPRET=1 set before timm_supertoken.ops is imported), else use "
            "backend='reference'")
    if grid > MAX_FUSED_GRID:
        raise ValueError(
            f'the Triton super-token backend supports grid <= {MAX_FUSED_GRID}, got {grid}; use backend=\'reference\'')


@torch.library.custom_op('timm_supertoken::super_token_clustering', mutates_args=())
def _super_token_fwd(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns the super tokens S (B, C, h, w) in x.dtype, and A (B, H, W, 9) and Z (B, h, w) in fp32 for backward."""
    _check_fused(x, grid)
    B, C, H, W = x.shape
    h, w = triton.cdiv(H, grid), triton.cdiv(W, grid)
    npix = triton.next_power_of_2(9 * grid * grid)
    block_c = max(16, min(triton.next_power_of_2(C), _TILE_ELEMS // npix))
    f32 = dict(device=x.device, dtype=torch.float32)
    tokens = [torch.empty((B, h, w, C), **f32), torch.empty((B, h, w, C), **f32)]
    out = torch.empty((B, C, h, w), device=x.device, dtype=x.dtype)
    norm = torch.empty((B, h, w), **f32)
    aff = torch.empty((B, H, W, 9), **f32)
    programs = (B * h * w,)
    _init_kernel[programs](
        x, tokens[0], C, H, W, h, w, *x.stride(),
        GRID=grid, CELL=triton.next_power_of_2(grid * grid), BLOCK_C=max(16, min(triton.next_power_of_2(C), 256)))
    for step in range(iters):
        last = step == iters - 1
        dst = out if last else tokens[(step + 1) % 2]
        # (B, C, h, w) strides of the destination; the fp32 ping-pong buffer is (B, h, w, C) in memory
        dst_strides = out.stride() if last else (h * w * C, 1, w * C, C)
        _iteration_kernel[programs](
            x, tokens[step % 2], dst, norm, aff,
            C, H, W, h, w, C ** -0.5,
            *x.stride(), *dst_strides,
            GRID=grid, NPIX=npix, WINDOW=_WINDOW, BLOCK_C=block_c, SAVE=last,
            num_warps=8 if npix >= 128 else 4)
    return out, aff, norm


@_super_token_fwd.register_fake
def _(x: torch.Tensor, grid: int, iters: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, C, H, W = x.shape
    h, w = (H + grid - 1) // grid, (W + grid - 1) // grid
    return (x.new_empty((B, C, h, w)), x.new_empty((B, H, W, 9), dtype=torch.float32),
            x.new_empty((B, h, w), dtype=torch.float32))


@torch.library.custom_op('timm_supertoken::super_token_clustering_backward', mutates_args=())
def _super_token_bwd(grad: torch.Tensor, aff: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    """dX (B, C, H, W) in grad.dtype from dS (B, C, h, w) and the saved A (B, H, W, 9), Z (B, h, w)."""
    B, C, h, w = grad.shape
    H, W = aff.shape[1], aff.shape[2]
    dx = torch.empty((B, C, H, W), device=grad.device, dtype=grad.dtype)
    block_w = min(64, triton.next_power_of_2(W))
    block_c = max(16, min(triton.next_power_of_2(C), 4096 // block_w))
    _backward_kernel[(B * H * triton.cdiv(W, block_w),)](
        grad, aff, norm, dx, C, H, W, h, w, *grad.stride(), *dx.stride(),
        GRID=grid, BLOCK_W=block_w, BLOCK_C=block_c)
    return dx


@_super_token_bwd.register_fake
def _(grad: torch.Tensor, aff: torch.Tensor, norm: torch.Tensor, grid: int) -> torch.Tensor:
    return grad.new_empty((grad.shape[0], grad.shape[1], aff.shape[1], aff.shape[2]))


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

    `validate` runs the reference path's input checks (a NaN/Inf scan costs one pass over X and a host
    sync; callers that already checked pass False). Half-precision inputs are computed in fp32 and the
    result is cast back to the input dtype.
    """
    if validate and not torch.compiler.is_compiling():
        from ..layers.super_token import check_super_token_input  # ops <-> layers import cycle
        check_super_token_input(x, grid, iters)
    _check_fused(x, grid)
    return _super_token_fwd(x, grid, iters)[0]
