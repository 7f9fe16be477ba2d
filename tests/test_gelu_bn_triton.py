"""The fused bias -> GELU -> BatchNorm epilogue against nn.GELU + nn.BatchNorm2d (the specification).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py); with one, compiled on CUDA tensors.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

triton = pytest.importorskip('triton')
from timm_supertoken import ops  # noqa: E402
from timm_supertoken.layers import ConvActNorm  # noqa: E402
from timm_supertoken.layers.super_token import BACKEND_ENV  # noqa: E402
from timm_supertoken.ops import gelu_batch_norm_triton as fused  # noqa: E402
from timm_supertoken.ops import gelu_bn_triton as gbn  # noqa: E402
from host_sync import HostSyncRecorder  # noqa: E402

DEVICE = 'cpu' if ops.INTERPRET else 'cuda'
# outputs are O(1) after normalisation; half precision may differ by one rounding step of values up to ~4
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 8e-3), torch.bfloat16: (1.6e-2, 6.4e-2)}


def _reference(u, bias, bn):
    z = u.float() + (bias[:, None, None] if bias is not None else 0)
    return bn(F.gelu(z)).to(u.dtype)


def _batch_norm(C, seed=0, **kwargs):
    bn = nn.BatchNorm2d(C, **kwargs).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    if bn.affine:
        bn.weight.data = torch.randn(C, generator=gen).to(DEVICE)
        bn.bias.data = torch.randn(C, generator=gen).to(DEVICE)
    if bn.track_running_stats:
        bn.running_mean.data = torch.randn(C, generator=gen).to(DEVICE)
        bn.running_var.data = torch.rand(C, generator=gen).to(DEVICE) + 0.5
    return bn


def _inputs(shape, dtype, seed=0, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(shape, generator=gen).to(device=DEVICE, dtype=dtype).contiguous(memory_format=torch.channels_last)
    bias = torch.randn(shape[1], generator=gen).to(DEVICE) if with_bias else None
    return u, bias


def _run(fn, u, bias, bn, seed=1):
    """Output and the gradients of u, the bias, γ and β for a fixed random output gradient."""
    u = u.detach().clone().requires_grad_(True)
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    out = fn(u, bias, bn)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    leaves = [t for t in (u, bias, bn.weight, bn.bias) if t is not None]
    return out, torch.autograd.grad(out, leaves, grad)


def _assert_matches(shape, dtype=torch.float32, with_bias=True, **bn_kwargs):
    u, bias = _inputs(shape, dtype, with_bias=with_bias)
    bn = _batch_norm(shape[1], **bn_kwargs).train()
    bn_ref = copy.deepcopy(bn)
    out, grads = _run(fused, u, bias, bn)
    out_ref, grads_ref = _run(_reference, u, bias, bn_ref)
    rtol, atol = TOL[dtype]
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == g_ref.dtype
        # Σ over up to R rows of O(1) terms: the parameter gradients grow like R, so compare relative to it
        torch.testing.assert_close(g.float(), g_ref.float(), rtol=rtol, atol=atol * max(1, g_ref.abs().max().item()))
    for name in ('running_mean', 'running_var', 'num_batches_tracked'):
        if getattr(bn_ref, name) is not None:
            torch.testing.assert_close(getattr(bn, name), getattr(bn_ref, name), rtol=1e-5, atol=1e-6)


# (B, C, H, W): C a power of two, not one, above the 64-channel tile (two channel blocks), one image, and a map
# of 4,608 rows at C = 64 (32-row tiles): 144 partials
SHAPES = [(2, 16, 5, 7), (3, 20, 9, 7), (2, 70, 3, 4), (1, 8, 1, 2), (2, 64, 48, 48)]


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
def test_training_matches_modules(shape, dtype):
    _assert_matches(shape, dtype)


@pytest.mark.parametrize('bn_kwargs', [dict(momentum=None), dict(affine=False), dict(track_running_stats=False),
                                       dict(eps=1e-3, momentum=0.3)])
def test_batch_norm_settings(bn_kwargs):
    _assert_matches((2, 12, 6, 5), **bn_kwargs)


@pytest.mark.parametrize('shape,max_partials', [((3, 20, 9, 7), 1), ((2, 64, 48, 48), 1), ((2, 64, 48, 48), 5)])
def test_reduction_programs_over_several_tiles(shape, max_partials, monkeypatch):
    """Capped reductions: each program walks several tiles (a partial last tile, uneven shares), and the combine
    and sum kernels walk the partials in several steps (a partial last step)."""
    monkeypatch.setattr(gbn, '_MAX_PARTIALS', max_partials)
    monkeypatch.setattr(gbn, '_PARTIAL_ROWS', 2)
    R, C = shape[0] * shape[2] * shape[3], shape[1]
    block_r = gbn._blocks(C)[0]
    programs, rows_per_program = gbn._row_programs(R, block_r)
    assert programs <= max_partials and rows_per_program > block_r and rows_per_program % block_r == 0
    _assert_matches(shape)


def test_conv_without_bias():
    _assert_matches((2, 12, 6, 5), with_bias=False)


def test_cumulative_average_over_several_steps():
    """momentum=None: running stats are the plain average over the steps, as nn.BatchNorm2d keeps them."""
    bn = _batch_norm(6, momentum=None).train()
    bn_ref = copy.deepcopy(bn)
    for seed in range(3):
        u, bias = _inputs((2, 6, 4, 4), torch.float32, seed=seed)
        fused(u, bias, bn)
        _reference(u, bias, bn_ref)
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var)
    assert bn.num_batches_tracked.item() == 3


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
def test_eval_uses_running_statistics(dtype):
    u, bias = _inputs((2, 20, 5, 6), dtype)
    bn = _batch_norm(20).eval()
    with torch.no_grad():
        out, out_ref = fused(u, bias, bn), _reference(u, bias, bn)
    torch.testing.assert_close(out, out_ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])
    assert bn.num_batches_tracked.item() == 0


def test_is_deterministic():
    u, bias = _inputs((2, 64, 48, 48), torch.float32)
    first = _run(fused, u, bias, _batch_norm(64).train())
    second = _run(fused, u, bias, _batch_norm(64).train())
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(a, b) for a, b in zip(first[1], second[1]))


def test_bad_input_is_named():
    bn = _batch_norm(8).train()
    with pytest.raises(ValueError, match=r'expects a \(B, 8, H, W\) map'):
        fused(torch.randn(2, 4, 3, 3, device=DEVICE), None, bn)
    with pytest.raises(TypeError, match='float64'):
        fused(torch.randn(2, 8, 3, 3, device=DEVICE, dtype=torch.float64), None, bn)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        fused(torch.randn(1, 8, 1, 1, device=DEVICE), None, bn)
    with pytest.raises(RuntimeError, match='no backward with running statistics'):
        fused(torch.randn(2, 8, 3, 3, device=DEVICE, requires_grad=True), None, bn.eval())
    # the plans hand the maps' own pointers to the kernels, which address them as (B·H·W, C) row-major matrices
    params = [torch.zeros(8, device=DEVICE)] * 3
    with pytest.raises(ValueError, match='channels_last-contiguous'):
        gbn.forward_plan(torch.randn(2, 8, 3, 3, device=DEVICE), *params)


def _conv_module(seed=0):
    torch.manual_seed(seed)
    module = ConvActNorm(8, 24, stride=2).to(DEVICE).to(memory_format=torch.channels_last)
    module.bn.weight.data.normal_()
    module.bn.bias.data.normal_()
    return module


def test_conv_module_fused_matches_modules(monkeypatch):
    """The layer's fused path: same output, input and parameter gradients and BN state as its modules."""
    # the two paths call the conv with and without its bias, for which cuDNN may pick algorithms whose TF32
    # roundings differ by ~1e-3: compare the epilogue, not TF32
    monkeypatch.setattr(torch.backends.cudnn, 'allow_tf32', False)
    monkeypatch.setattr(ConvActNorm, 'fuse_epilogue', True)  # opt-in
    calls = []
    original = gbn.gelu_batch_norm_triton
    monkeypatch.setattr(gbn, 'gelu_batch_norm_triton', lambda *a: calls.append(1) or original(*a))
    fused_module, plain_module = _conv_module(), _conv_module()
    x = torch.randn(2, 8, 15, 16, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    x = x.contiguous(memory_format=torch.channels_last)
    results = []
    for backend, module in (('triton', fused_module), ('reference', plain_module)):
        monkeypatch.setenv(BACKEND_ENV, backend)
        xg = x.clone().requires_grad_(True)
        out = module(xg)
        out.backward(torch.ones_like(out).mul_(torch.arange(out.numel(), device=DEVICE).reshape(out.shape) % 7))
        results.append((out, xg.grad, {n: p.grad for n, p in module.named_parameters()}, module.bn.running_var))
        with torch.no_grad():
            results[-1] += (module.eval()(x),)
    assert len(calls) == 2  # training and eval both took the fused path
    (out, dx, grads, var, evaluated), (out_ref, dx_ref, grads_ref, var_ref, evaluated_ref) = results
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(dx, dx_ref, rtol=1e-4, atol=1e-3)
    for name in grads_ref:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-3, msg=name)
    torch.testing.assert_close(var, var_ref)
    torch.testing.assert_close(evaluated, evaluated_ref, rtol=1e-4, atol=1e-4)


def test_conv_module_keeps_modules_where_the_epilogue_does_not_apply(monkeypatch):
    monkeypatch.setattr(ConvActNorm, 'fuse_epilogue', True)
    calls = []
    monkeypatch.setattr(gbn, 'gelu_batch_norm_triton', lambda *a: calls.append(1))
    monkeypatch.setenv(BACKEND_ENV, 'triton')
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    module = _conv_module()
    module.eval()(x.requires_grad_(True))  # eval BN that autograd must go through
    sync = _conv_module()
    sync.bn = nn.SyncBatchNorm(24).to(DEVICE)  # timm's --sync-bn
    sync.eval()(x)
    torch.jit.script(_conv_module())(x)  # TorchScript
    monkeypatch.setattr(ConvActNorm, 'fuse_epilogue', False)  # the default
    _conv_module().train()(x)
    assert not calls


def test_training_step_reads_nothing_back():
    """With a fixed momentum the fused forward and backward never wait on the host (CUDA-graph capturable)."""
    u, bias = _inputs((2, 8, 5, 5), torch.float32)
    bn = _batch_norm(8).train()
    with HostSyncRecorder() as recorder:
        _run(fused, u, bias, bn)
    assert recorder.calls == []
