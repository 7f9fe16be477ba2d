"""The reference super-token clustering path against an independent loop implementation of docs/design.md §2,
and the runtime settings (`timm_supertoken.layers.config`) that choose the module's path."""
import importlib.util
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

from loop_reference import super_token_clustering_loop
from timm_supertoken.layers import (
    SuperTokenClustering,
    config,
    get_backend,
    get_check_finite,
    is_autotune_enabled,
    set_backend,
    set_check_finite,
    super_token_affinities,
    super_token_aggregate,
    super_token_clustering,
    use_autotune,
    use_backend,
    use_check_finite,
)

# tolerances against the float64 loop: fp32 rounding, and bf16's 8-bit mantissa on the output cast
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def _random_cases(n: int, seed: int = 0):
    rng = random.Random(seed)
    return [
        (rng.randint(1, 2), rng.randint(1, 6), rng.randint(1, 11), rng.randint(1, 11), rng.randint(1, 4), rng.randint(1, 4))
        for _ in range(n)
    ]


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('B,C,H,W,grid,iters', _random_cases(12) + [(1, 4, 7, 5, 2, 3), (2, 3, 4, 8, 4, 1)])
def test_matches_loop_reference(B, C, H, W, grid, iters, dtype):
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(H * 100 + W)).to(dtype)
    out = super_token_clustering(x, grid, iters)
    expected = super_token_clustering_loop(x.double(), grid, iters)
    assert out.shape == (B, C, -(-H // grid), -(-W // grid))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, **TOLERANCES[dtype])


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 2), C=st.integers(1, 5), H=st.integers(1, 10), W=st.integers(1, 10),
    grid=st.integers(1, 4), iters=st.integers(1, 4), seed=st.integers(0, 2 ** 16),
)
def test_matches_loop_reference_property(B, C, H, W, grid, iters, seed):
    x = torch.randn(B, C, H, W, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(super_token_clustering(x, grid, iters), super_token_clustering_loop(x, grid, iters))


@pytest.mark.parametrize('B,C,H,W,grid,iters', [(2, 5, 7, 9, 2, 3), (1, 3, 6, 6, 3, 1), (1, 4, 5, 8, 1, 2)])
def test_gradient_matches_loop_reference(B, C, H, W, grid, iters):
    x = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn_like(super_token_clustering(x, grid, iters))
    grad, = torch.autograd.grad(super_token_clustering(x, grid, iters), x, grad_out)
    expected, = torch.autograd.grad(super_token_clustering_loop(x, grid, iters), x, grad_out)
    torch.testing.assert_close(grad, expected)


@pytest.mark.parametrize('grid,iters,H,W', [(2, 3, 7, 9), (3, 2, 5, 4), (1, 1, 3, 4), (4, 4, 9, 6)])
def test_gradcheck_of_the_differentiable_aggregation(grid, iters, H, W):
    """gradcheck in float64 with the affinities held constant, as the operator defines its gradient (STViT)."""
    x = torch.randn(2, 4, H, W, dtype=torch.float64, requires_grad=True)
    affinity, norm = super_token_affinities(x, grid, iters)
    assert not affinity.requires_grad and not norm.requires_grad
    assert torch.autograd.gradcheck(lambda x: super_token_aggregate(x, affinity, norm, grid), (x,))
    assert torch.autograd.gradgradcheck(lambda x: super_token_aggregate(x, affinity, norm, grid), (x,))
    torch.testing.assert_close(super_token_aggregate(x, affinity, norm, grid), super_token_clustering(x, grid, iters))


def test_affinities_are_a_masked_softmax():
    x = torch.randn(2, 6, 7, 9, dtype=torch.float64)
    affinity, norm = super_token_affinities(x, 2, 3)
    assert affinity.shape == (2, 4, 5, 4, 9)
    real = torch.zeros(4 * 2, 5 * 2, dtype=torch.bool)
    real[:7, :9] = True
    real = real.reshape(4, 2, 5, 2).permute(0, 2, 1, 3).reshape(4, 5, 4)
    sums = affinity.sum(-1)
    torch.testing.assert_close(sums[:, real], torch.ones_like(sums[:, real]))  # rows of real pixels sum to 1
    assert (sums[:, ~real] == 0).all()  # padded pixels take part in no sum
    assert (affinity[:, 0, :, :, :3] == 0).all()  # the top row has no neighbours above
    assert (affinity[:, :, -1, :, 2::3] == 0).all()  # the right column has none to the right
    assert (norm > 0).all()


def test_padding_does_not_bias_border_tokens():
    """A cell holding a single real pixel starts as that pixel and, alone on the grid, stays that pixel."""
    x = torch.randn(1, 3, 1, 1)
    for grid in (1, 2, 3, 4):
        torch.testing.assert_close(super_token_clustering(x, grid, 3), x)
    x = torch.randn(1, 4, 5, 5, dtype=torch.float64)
    out = super_token_clustering(x, 4, 1)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3))
    assert not torch.allclose(out, super_token_clustering(padded, 4, 1)[..., :2, :2])


def test_iters_one_uses_the_average_pooled_tokens():
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    expected = super_token_clustering_loop(x, 2, 1)
    torch.testing.assert_close(super_token_clustering(x, 2, 1), expected)
    assert not torch.allclose(super_token_clustering(x, 2, 1), torch.nn.functional.avg_pool2d(x, 2))


def test_module_matches_function_and_reprs():
    module = SuperTokenClustering(grid=2, iters=3)
    x = torch.randn(2, 16, 10, 14)
    torch.testing.assert_close(module(x), super_token_clustering(x, 2, 3))
    assert 'grid=2, iters=3' in repr(module)
    assert not list(module.parameters())


def test_meta_device():
    out = SuperTokenClustering(2, 3)(torch.empty(4, 64, 27, 29, device='meta'))
    assert out.device.type == 'meta' and out.shape == (4, 64, 14, 15)


def test_torchscript():
    module = SuperTokenClustering(3, 2)
    scripted = torch.jit.script(module)
    x = torch.randn(2, 8, 10, 11)
    torch.testing.assert_close(scripted(x), module(x))


def test_torch_fx():
    from timm.models import get_notrace_functions, get_notrace_modules
    from torch.fx import Tracer, GraphModule

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.cluster = SuperTokenClustering(2, 3)

        def forward(self, x):
            return self.cluster(self.conv(x)) + super_token_clustering(self.conv(x), 2, 2)

    class LeafTracer(Tracer):
        def is_leaf_module(self, m, name):
            return type(m) in get_notrace_modules() or super().is_leaf_module(m, name)

    net = Net()
    tracer = LeafTracer(autowrap_functions=tuple(get_notrace_functions()))
    traced = GraphModule(net, tracer.trace(net))
    x = torch.randn(2, 3, 9, 13)
    torch.testing.assert_close(traced(x), net(x))


@pytest.mark.parametrize('bad,error,match', [
    (torch.randint(0, 255, (1, 3, 8, 8)), TypeError, 'floating-point'),
    (torch.full((1, 3, 8, 8), float('nan')), ValueError, 'NaN or Inf'),
    (torch.tensor([[[[float('inf')]]]]), ValueError, 'NaN or Inf'),
    (torch.randn(3, 8, 8), ValueError, r'\(B, C, H, W\)'),
    (torch.randn(1, 3, 0, 8), ValueError, 'empty'),
])
def test_bad_input_is_named(bad, error, match):
    with pytest.raises(error, match=match):
        SuperTokenClustering()(bad)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    C=st.integers(1, 4), H=st.integers(1, 9), W=st.integers(1, 9), grid=st.integers(1, 4), iters=st.integers(1, 4),
    value=st.sampled_from([float('nan'), float('inf'), -float('inf')]), where=st.floats(0, 1, exclude_max=True),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_one_nonfinite_pixel_anywhere_is_named(C, H, W, grid, iters, value, where, dtype):
    """The module checks its output for NaN/Inf, not its input: one bad value, wherever it is, must still show."""
    x = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(H * 10 + W)).to(dtype)
    x.view(-1)[int(where * x.numel())] = value
    with pytest.raises(ValueError, match='input contains NaN or Inf'):
        SuperTokenClustering(grid, iters)(x)


def test_overflow_of_a_finite_input_is_named():
    with pytest.raises(ValueError, match=r'finite input produced NaN.*max \|x\| = 3e\+20'):
        SuperTokenClustering()(torch.full((1, 2, 4, 4), 3e20))


@pytest.mark.parametrize('kwargs,match', [(dict(grid=0), 'grid must be >= 1'), (dict(iters=0), 'iterations t must be >= 1')])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SuperTokenClustering(**kwargs)


def _config_loaded_now():
    """A fresh copy of `timm_supertoken.layers.config`, as an import in a new process would load it (the process's own
    module, and its settings, stay as they are)."""
    spec = importlib.util.spec_from_file_location('fresh_config', config.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_settings_are_read_from_the_environment_once_at_import(monkeypatch):
    monkeypatch.setenv('TIMM_SUPERTOKEN_BACKEND', 'reference')
    monkeypatch.setenv('TIMM_SUPERTOKEN_AUTOTUNE', '0')
    monkeypatch.setenv('TIMM_SUPERTOKEN_CHECK_FINITE', '1')
    fresh = _config_loaded_now()
    assert (fresh.get_backend(), fresh.is_autotune_enabled(), fresh.get_check_finite()) == ('reference', False, True)
    monkeypatch.setenv('TIMM_SUPERTOKEN_BACKEND', 'triton')  # read at import only
    assert fresh.get_backend() == 'reference'
    for name in ('TIMM_SUPERTOKEN_BACKEND', 'TIMM_SUPERTOKEN_AUTOTUNE', 'TIMM_SUPERTOKEN_CHECK_FINITE'):
        monkeypatch.delenv(name)
    fresh = _config_loaded_now()
    assert (fresh.get_backend(), fresh.is_autotune_enabled(), fresh.get_check_finite()) == ('auto', True, None)


@pytest.mark.parametrize('name,value', [('TIMM_SUPERTOKEN_BACKEND', 'cuda'), ('TIMM_SUPERTOKEN_AUTOTUNE', 'fast'),
                                        ('TIMM_SUPERTOKEN_CHECK_FINITE', 'yes')])
def test_a_bad_environment_value_is_named_at_import(name, value, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=rf'\${name} must be one of .* got {value!r}'):
        _config_loaded_now()


def test_context_managers_restore_the_setting_even_on_error():
    before = (get_backend(), is_autotune_enabled(), get_check_finite())
    with pytest.raises(RuntimeError):
        with use_backend('reference'), use_autotune(not before[1]), use_check_finite(False):
            assert (get_backend(), is_autotune_enabled(), get_check_finite()) == ('reference', not before[1], False)
            raise RuntimeError
    assert (get_backend(), is_autotune_enabled(), get_check_finite()) == before


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="backend must be one of .* got 'cuda'"):
        set_backend('cuda')
    with pytest.raises(TypeError, match="True, False or None, got 'yes'"):
        set_check_finite('yes')
    assert get_backend() == 'auto' and get_check_finite() is None  # unchanged


def test_check_finite_setting_decides_the_reference_scan():
    """By default the reference path on CPU names NaN input; switched off, the NaN reaches the output instead."""
    x = torch.full((1, 4, 4, 4), float('nan'))
    with pytest.raises(ValueError, match='NaN or Inf'):
        SuperTokenClustering(backend='reference')(x)
    with use_check_finite(False):
        assert SuperTokenClustering(backend='reference')(x).isnan().all()


def test_backend_setting_decides_the_path_of_auto_modules(monkeypatch):
    """'auto' modules follow the setting at each call; a module built with a backend keeps it."""
    from timm_supertoken.layers import super_token as layer

    chosen = []
    monkeypatch.setattr(layer, '_fused_super_token_clustering', lambda x, grid, iters: chosen.append('triton') or x)
    x = torch.randn(1, 4, 4, 4)
    auto, reference = SuperTokenClustering(), SuperTokenClustering(backend='reference')
    with use_backend('triton'):
        auto(x)
        reference(x)
    auto(x)  # the default again: a CPU tensor takes the reference path
    assert chosen == ['triton']
