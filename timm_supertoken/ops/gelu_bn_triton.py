"""Fused conv epilogue of the paper's convolution module (eq. 1): bias -> GELU -> BatchNorm, forward and backward.

With `ConvActNorm.fuse_epilogue = True` (opt-in: on an H200 the stem is bound by host launches and the plain
modules were faster, see its docstring), `ConvActNorm` runs its convolution without bias and hands the
(B, C, H, W) channels_last result u to this op, which is the row-major (R = B·H·W, C) matrix the kernels
address. With z = u + b, y = GELU(z) (erf form):

    training:  μ = mean_r y,  σ² = mean_r (y − μ)²  (biased),  ŷ = (y − μ)·rstd,  rstd = (σ² + ε)^-½
               running stats ← lerp(running, (μ, σ²·R/(R − 1)), momentum)            as nn.BatchNorm2d
    output:    out = γ·ŷ + β
    backward:  dβ = Σ_r g,  dγ = Σ_r g·ŷ,  dz = GELU'(z)·γ·rstd·(g − dβ/R − ŷ·dγ/R),  du = dz,  db = Σ_r dz

Why: eager PyTorch runs this as conv-with-bias, GELU, BN statistics and BN normalisation forward, then BN
backward (reduce, elementwise), GELU backward and the conv's bias-gradient reduction: about 14 passes over a
(B, C, H, W) map and three saved copies of it. Here it is 8 passes and one saved map (u); y and ŷ are
recomputed in registers, the bias gradient falls out of the backward's reduction, and the statistics are
combined per block with Chan's formula (stable, and deterministic: no atomics).

Traffic (e = bytes per element of u; R·C·e = one pass): forward 3 passes (statistics read u; normalise reads
u, writes out), backward 5 (reduce reads u, g; input gradient reads u, g, writes du), plus at most 1024·C
fp32 partials per reduction. For the stem's largest map, B=128 at 112×112×32 in bf16 (103 MB), that is 0.8 GB
per fwd+bwd: ~0.2 ms at 4 TB/s.

Launches: forward 3 (statistics, combine, normalise), backward 4 (reduce, sum, input gradient, sum), eval 1.
A reduction's row programs each cover a run of whole tiles (at most `_MAX_PARTIALS` programs), so the combine
and sum kernels, one program per 16 channels, walk at most 1024 partials in 4 steps. The first design wrote one
partial per tile and walked them with one program per 64 channels (25-196 steps per stem module): that walk
made the epilogue 0.9 ms per training step slower than the modules it replaces on an H200.
"""
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import nn

from .super_token_triton import INTERPRET, Launch, cdiv, next_power_of_2, run_plan

__all__ = ['gelu_batch_norm_triton', 'forward_plan', 'eval_plan', 'backward_plan', 'GELU_BN_DTYPES']

GELU_BN_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TILE_ELEMENTS = 2048  # rows × channels per tile
# 8 elements per thread: the reductions keep their running sums and the per-channel constants live across the
# tiles they walk, and at 16 per thread (4096-element tiles) they took 98-128 registers and 16 resident warps
# (benchmarks/kernel_report.py)
_WARPS = 8
# Reductions run at most this many programs per channel block, each over a run of whole tiles, so the partials
# that the combine and sum kernels then walk serially number at most 1024 per channel. At one partial per tile
# that walk took 25-196 steps per stem module: 0.875 ms of the combine alone per training step at B=128 on an
# H200 (docs/benchmarks.md). 1024 programs of 8 warps still fill every SM of an A100/H100/H200; a fixed number,
# not one per SM, keeps the statistics bitwise identical across GPUs.
_MAX_PARTIALS = 1024
# the combine and sum kernels' tile: 16 channels per program (one program per 16 channels runs in parallel),
# 256 partials per step, so 1024 partials take 4 steps
_PARTIAL_CHANNELS, _PARTIAL_ROWS = 16, 256


@triton.jit
def _normal_cdf(z):
    """Φ(z): GELU(z) = z·Φ(z), and its derivative Φ(z) + z·φ(z) reuses it (one erf per element)."""
    return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))


@triton.jit
def _channels(C, BLOCK_C: tl.constexpr):
    """This program's channel block program_id(1): (channels c, c < C)."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return c, c < C


@triton.jit
def _tile(r0, R, c, cm, C, BLOCK_R: tl.constexpr):
    """The [BLOCK_R, BLOCK_C] tile of rows r0.. (int64) and channels c: (element mask, int64 offsets)."""
    r = r0 + tl.arange(0, BLOCK_R)
    return (r < R)[:, None] & cm[None, :], r[:, None] * C + c[None, :]


@triton.jit
def _row_range(R, ROWS_PER_PROGRAM):
    """This reduction program's rows [start, end): a run of whole tiles, so its partial sums cover many tiles."""
    start = tl.program_id(0).to(tl.int64) * ROWS_PER_PROGRAM
    return start, tl.minimum(start + ROWS_PER_PROGRAM, R)


@triton.jit
def _chan_merge(count, mean, m2, n, n_mean, n_m2):
    """(count, mean, M2) of a group merged with n more values of mean n_mean and M2 n_m2 (Chan et al.'s formula)."""
    total = count + n
    delta = n_mean - mean
    return total, mean + delta * (n / total), m2 + n_m2 + delta * delta * (count * n / total)


@triton.jit
def _activation(u_ptr, bias_ptr, offs, c, cm, mask):
    """z = u + b, Φ(z) and y = GELU(z) in fp32 for one tile at u_ptr; y is 0 outside the matrix so sums ignore it."""
    z = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32) + tl.load(bias_ptr + c, mask=cm, other=0.0)[None, :]
    cdf = _normal_cdf(z)
    return z, cdf, tl.where(mask, z * cdf, 0.0)


@triton.jit
def _stats_kernel(u_ptr, bias_ptr, part_mean_ptr, part_m2_ptr, R, C, ROWS_PER_PROGRAM,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per program: the mean of y over its rows and their sum of squared deviations (M2), per channel."""
    start, end = _row_range(R, ROWS_PER_PROGRAM)
    c, cm = _channels(C, BLOCK_C)
    count = 0.0
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        mask, offs = _tile(r0, R, c, cm, C, BLOCK_R)
        _, _, y = _activation(u_ptr, bias_ptr, offs, c, cm, mask)
        rows = tl.minimum(end - r0, BLOCK_R).to(tl.float32)
        tile_mean = tl.sum(y, axis=0) / rows
        dev = tl.where(mask, y - tile_mean[None, :], 0.0)
        count, mean, m2 = _chan_merge(count, mean, m2, rows, tile_mean, tl.sum(dev * dev, axis=0))
    out = tl.program_id(0) * C + c
    tl.store(part_mean_ptr + out, mean, mask=cm)
    tl.store(part_m2_ptr + out, m2, mask=cm)


@triton.jit
def _combine_kernel(part_mean_ptr, part_m2_ptr, mean_ptr, rstd_ptr, run_mean_ptr, run_var_ptr,
                    P, R, C, ROWS_PER_PROGRAM, eps, factor,
                    UPDATE_RUNNING: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """μ and rstd from the P block partials (Chan's parallel formula, in a fixed order), and the running update."""
    c, cm = _channels(C, BLOCK_C)
    count = 0.0
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        pm = p < P
        rows = tl.where(pm, tl.minimum(R - p.to(tl.int64) * ROWS_PER_PROGRAM, ROWS_PER_PROGRAM), 0).to(tl.float32)
        mask = pm[:, None] & cm[None, :]
        part_mean = tl.load(part_mean_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
        part_m2 = tl.load(part_m2_ptr + p[:, None] * C + c[None, :], mask=mask, other=0.0)
        tile_count = tl.sum(rows, axis=0)
        tile_mean = tl.sum(rows[:, None] * part_mean, axis=0) / tile_count
        dev = tl.where(mask, part_mean - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(part_m2, axis=0) + tl.sum(rows[:, None] * dev * dev, axis=0)
        count, mean, m2 = _chan_merge(count, mean, m2, tile_count, tile_mean, tile_m2)
    var = m2 / count
    tl.store(mean_ptr + c, mean, mask=cm)
    tl.store(rstd_ptr + c, 1.0 / tl.sqrt(var + eps), mask=cm)
    if UPDATE_RUNNING:
        old_mean = tl.load(run_mean_ptr + c, mask=cm, other=0.0).to(tl.float32)
        old_var = tl.load(run_var_ptr + c, mask=cm, other=0.0).to(tl.float32)
        unbiased = var * (count / (count - 1.0))
        tl.store(run_mean_ptr + c, old_mean + factor * (mean - old_mean), mask=cm)
        tl.store(run_var_ptr + c, old_var + factor * (unbiased - old_var), mask=cm)


@triton.jit
def _normalize_kernel(u_ptr, bias_ptr, mean_ptr, rstd_ptr, weight_ptr, shift_ptr, out_ptr, R, C,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = γ·(GELU(u + b) − μ)·rstd + β, in u's dtype. One tile per program."""
    c, cm = _channels(C, BLOCK_C)
    r0 = tl.program_id(0).to(tl.int64) * BLOCK_R
    mask, offs = _tile(r0, R, c, cm, C, BLOCK_R)
    _, _, y = _activation(u_ptr, bias_ptr, offs, c, cm, mask)
    scale = tl.load(weight_ptr + c, mask=cm, other=0.0) * tl.load(rstd_ptr + c, mask=cm, other=0.0)
    shift = tl.load(shift_ptr + c, mask=cm, other=0.0) - tl.load(mean_ptr + c, mask=cm, other=0.0) * scale
    tl.store(out_ptr + offs, y * scale[None, :] + shift[None, :], mask=mask)


@triton.jit
def _grad_reduce_kernel(u_ptr, bias_ptr, mean_ptr, rstd_ptr, grad_ptr, part_ptr, P, R, C, ROWS_PER_PROGRAM,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per program: Σ g and Σ g·ŷ per channel over its rows, into part[0] and part[1] (P, C) for dβ and dγ."""
    start, end = _row_range(R, ROWS_PER_PROGRAM)
    c, cm = _channels(C, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=cm, other=0.0)
    sum_g = tl.zeros((BLOCK_C,), dtype=tl.float32)
    sum_g_y_hat = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        mask, offs = _tile(r0, R, c, cm, C, BLOCK_R)
        _, _, y = _activation(u_ptr, bias_ptr, offs, c, cm, mask)
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        sum_g += tl.sum(g, axis=0)
        sum_g_y_hat += tl.sum(tl.where(mask, g * ((y - mean[None, :]) * rstd[None, :]), 0.0), axis=0)
    out = tl.program_id(0) * C + c
    tl.store(part_ptr + out, sum_g, mask=cm)
    tl.store(part_ptr + P * C + out, sum_g_y_hat, mask=cm)


@triton.jit
def _grad_input_kernel(u_ptr, bias_ptr, mean_ptr, rstd_ptr, weight_ptr, grad_ptr, sums_ptr, du_ptr, part_db_ptr,
                       R, C, ROWS_PER_PROGRAM, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """du = GELU'(z)·γ·rstd·(g − dβ/R − ŷ·dγ/R), and per program Σ du per channel (the conv bias gradient)."""
    start, end = _row_range(R, ROWS_PER_PROGRAM)
    c, cm = _channels(C, BLOCK_C)
    mean = tl.load(mean_ptr + c, mask=cm, other=0.0)
    rstd = tl.load(rstd_ptr + c, mask=cm, other=0.0)
    mean_g = tl.load(sums_ptr + c, mask=cm, other=0.0) / R
    mean_g_y_hat = tl.load(sums_ptr + C + c, mask=cm, other=0.0) / R
    scale = tl.load(weight_ptr + c, mask=cm, other=0.0) * rstd
    sum_du = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        mask, offs = _tile(r0, R, c, cm, C, BLOCK_R)
        z, cdf, y = _activation(u_ptr, bias_ptr, offs, c, cm, mask)
        y_hat = (y - mean[None, :]) * rstd[None, :]
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        gelu_grad = cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)  # Φ(z) + z·φ(z)
        du = tl.where(mask, gelu_grad * scale[None, :] * (g - mean_g[None, :] - y_hat * mean_g_y_hat[None, :]), 0.0)
        tl.store(du_ptr + offs, du, mask=mask)
        sum_du += tl.sum(du, axis=0)
    tl.store(part_db_ptr + tl.program_id(0) * C + c, sum_du, mask=cm)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, P, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out[k, c] = Σ_p part[k, p, c], in a fixed order: the parameter gradients come out deterministic."""
    k = tl.program_id(0).to(tl.int64)
    c, cm = _channels(C, BLOCK_C)
    acc = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        acc += tl.load(part_ptr + (k * P + p[:, None]) * C + c[None, :], mask=(p < P)[:, None] & cm[None, :],
                       other=0.0)
    tl.store(out_ptr + k * C + c, tl.sum(acc, axis=0), mask=cm)


def _blocks(C: int) -> Tuple[int, int]:
    """(BLOCK_R, BLOCK_C): all channels of a row in one tile up to 64, rows filling _TILE_ELEMENTS."""
    block_c = min(next_power_of_2(C), 64)
    return _TILE_ELEMENTS // block_c, block_c


def _row_programs(R: int, block_r: int) -> Tuple[int, int]:
    """(P, rows per program) of a reduction over R rows: at most _MAX_PARTIALS programs of whole, evenly shared tiles.

    P is also the number of partials that one program per channel block then sums serially.
    """
    tiles = cdiv(R, block_r)
    tiles_per_program = cdiv(tiles, _MAX_PARTIALS)
    return cdiv(tiles, tiles_per_program), tiles_per_program * block_r


def _matrix_shape(u: torch.Tensor) -> Tuple[int, int]:
    """(R, C) of the row-major (B·H·W, C) matrix that a channels_last (B, C, H, W) map is in memory.

    The kernels take the maps themselves, as the super-token kernels do: the same data pointer as a
    permuted (R, C) view, without the view's two tensor ops per map: about 40 of the op's 290 µs of host
    time per forward+backward on an EPYC core, with the launches' work removed. Only a dense channels_last map
    has that layout, so anything else is refused here rather than read out of order.
    """
    if not u.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f'GELU-BatchNorm plans take channels_last-contiguous maps, got strides {u.stride()} for '
                         f'shape {tuple(u.shape)}')
    return u.numel() // u.shape[1], u.shape[1]


def _fp32(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return torch.empty(shape, device=like.device, dtype=torch.float32)


def forward_plan(u: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
                 running_mean: Optional[torch.Tensor] = None, running_var: Optional[torch.Tensor] = None,
                 factor: float = 0.0, eps: float = 1e-5) -> Tuple[List[Launch], Tuple[torch.Tensor, ...]]:
    """The training forward's launches for a channels_last u, and its outputs (out, μ, rstd), allocated.

    Running statistics are updated in place when given. u may be a meta tensor (the kernel report compiles
    exactly these launches).
    """
    R, C = _matrix_shape(u)
    block_r, block_c = _blocks(C)
    (P, rows_per_program), channel_blocks = _row_programs(R, block_r), cdiv(C, block_c)
    part_mean, part_m2 = _fp32(u, 2, P, C)
    mean, rstd = _fp32(u, 2, C)
    update = running_mean is not None
    launches = [
        Launch(_stats_kernel, lambda meta: (P, channel_blocks),
               (u, bias, part_mean, part_m2, R, C, rows_per_program),
               dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS)),
        Launch(_combine_kernel, lambda meta: (1, cdiv(C, _PARTIAL_CHANNELS)),
               (part_mean, part_m2, mean, rstd, running_mean if update else mean, running_var if update else rstd,
                P, R, C, rows_per_program, eps, factor),
               dict(UPDATE_RUNNING=update, BLOCK_P=_PARTIAL_ROWS, BLOCK_C=_PARTIAL_CHANNELS, num_warps=_WARPS)),
    ]
    normalize, out = eval_plan(u, bias, weight, shift, mean, rstd)
    return launches + normalize, (out, mean, rstd)


def eval_plan(u: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor) -> Tuple[List[Launch], torch.Tensor]:
    """The normalisation's launch with given statistics (eval: the running ones), and its output, allocated."""
    R, C = _matrix_shape(u)
    block_r, block_c = _blocks(C)
    out = torch.empty_like(u, memory_format=torch.channels_last)
    launch = Launch(_normalize_kernel, lambda meta: (cdiv(R, block_r), cdiv(C, block_c)),
                    (u, bias, mean, rstd, weight, shift, out, R, C),
                    dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS))
    return [launch], out


def backward_plan(u: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                  rstd: torch.Tensor, grad: torch.Tensor) -> Tuple[List[Launch], Tuple[torch.Tensor, ...]]:
    """The backward's launches for the output gradient, and (du, [dβ; dγ], db), allocated."""
    R, C = _matrix_shape(u)
    g = grad.contiguous(memory_format=torch.channels_last)
    block_r, block_c = _blocks(C)
    (P, rows_per_program), channel_blocks = _row_programs(R, block_r), cdiv(C, block_c)
    part, part_db = _fp32(u, 2, P, C), _fp32(u, 1, P, C)
    sums, db = _fp32(u, 2, C), _fp32(u, 1, C)
    du = torch.empty_like(u, memory_format=torch.channels_last)
    tiles = dict(BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_WARPS)
    partial_blocks = cdiv(C, _PARTIAL_CHANNELS)
    sum_tiles = dict(BLOCK_P=_PARTIAL_ROWS, BLOCK_C=_PARTIAL_CHANNELS, num_warps=_WARPS)
    launches = [
        Launch(_grad_reduce_kernel, lambda meta: (P, channel_blocks),
               (u, bias, mean, rstd, g, part, P, R, C, rows_per_program), tiles),
        Launch(_sum_partials_kernel, lambda meta: (2, partial_blocks), (part, sums, P, C), sum_tiles),
        Launch(_grad_input_kernel, lambda meta: (P, channel_blocks),
               (u, bias, mean, rstd, weight, g, sums, du, part_db, R, C, rows_per_program), tiles),
        Launch(_sum_partials_kernel, lambda meta: (1, partial_blocks), (part_db, db, P, C), sum_tiles),
    ]
    return launches, (du, sums, db[0])


class _GeluBatchNorm(torch.autograd.Function):
    """Training-mode bias -> GELU -> BatchNorm with batch statistics; the backward recomputes y from u."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, bias: torch.Tensor, weight: torch.Tensor, shift: torch.Tensor,
                running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor], factor: float,
                eps: float) -> torch.Tensor:
        out, mean, rstd = run_plan(forward_plan(u, bias, weight, shift, running_mean, running_var, factor, eps))
        ctx.save_for_backward(u, bias, weight, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        du, sums, db = run_plan(backward_plan(*ctx.saved_tensors, grad))
        return du, db, sums[1], sums[0], None, None, None, None


def _check(u: torch.Tensor, bn: nn.BatchNorm2d) -> None:
    if u.dim() != 4 or u.shape[1] != bn.num_features:
        raise ValueError(f'GELU-BatchNorm expects a (B, {bn.num_features}, H, W) map, got shape {tuple(u.shape)}')
    if u.dtype not in GELU_BN_DTYPES:
        raise TypeError(f'GELU-BatchNorm takes {GELU_BN_DTYPES}, got {u.dtype}')
    if not (u.is_cuda or INTERPRET):
        raise RuntimeError(f'the Triton GELU-BatchNorm needs a CUDA tensor, got one on {u.device}')


def gelu_batch_norm_triton(u: torch.Tensor, bias: Optional[torch.Tensor], bn: nn.BatchNorm2d) -> torch.Tensor:
    """bn(GELU(u + bias)) for a (B, C, H, W) conv output u, with nn.BatchNorm2d's semantics and state updates.

    Training (or no running statistics) uses batch statistics and updates the running ones as the module
    does; eval normalises with the running statistics in one pass. The result is channels_last in u's dtype.
    """
    _check(u, bn)
    u = u.contiguous(memory_format=torch.channels_last)
    C = u.shape[1]
    # a conv without bias and a BN without affine (γ = 1, β = 0) run the same kernels
    bias = bias if bias is not None else u.new_zeros(C, dtype=torch.float32)
    weight = bn.weight if bn.weight is not None else u.new_ones(C, dtype=torch.float32)
    shift = bn.bias if bn.bias is not None else u.new_zeros(C, dtype=torch.float32)
    batch_stats = bn.training or bn.running_mean is None
    if not batch_stats:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (u, bias, weight, shift)):
            raise RuntimeError('the Triton GELU-BatchNorm has no backward with running statistics (BatchNorm in '
                               'eval mode); run it under torch.no_grad() or use the modules')
        return run_plan(eval_plan(u, bias, weight, shift, bn.running_mean.float(),
                                  torch.rsqrt(bn.running_var.float() + bn.eps)))
    if u.numel() // C <= 1:
        raise ValueError(f'Expected more than 1 value per channel when training, got input size {tuple(u.shape)}')
    factor = 0.0
    update = bn.training and bn.track_running_stats and bn.running_mean is not None
    if update:
        bn.num_batches_tracked.add_(1)
        # nn.BatchNorm2d's rule: a fixed momentum, or the cumulative average (momentum=None)
        factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)
    return _GeluBatchNorm.apply(u, bias, weight, shift, bn.running_mean if update else None,
                                bn.running_var if update else None, factor, bn.eps)
