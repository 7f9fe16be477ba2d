"""The fused Triton super-token clustering against the reference path (the specification).

Without a GPU the kernels run in Triton's interpreter: tests/conftest.py sets TRITON_INTERPRET=1 before
anything imports Triton (the variable is read at import time). With a GPU they run compiled on CUDA tensors.
"""
from types import SimpleNamespace

import pytest
import torch

triton = pytest.importorskip('triton')
from timm_supertoken import ops  # noqa: E402
from timm_supertoken.ops import _triton_compat as compat, super_token_triton as st  # noqa: E402
from hypothesis import given, settings, strategies as hs  # noqa: E402

from timm_supertoken.functional import check_finite, check_super_token_input, super_token_clustering  # noqa: E402
from timm_supertoken.layers import (  # noqa: E402
    SuperTokenClustering, set_backend, use_autotune, use_backend, use_check_finite)
from loop_reference import super_token_clustering_loop  # noqa: E402
from host_sync import HostSyncRecorder, OpRecorder  # noqa: E402

if ops.INTERPRET:
    DEVICE = 'cpu'
elif torch.cuda.is_available():
    DEVICE = 'cuda'
else:
    # never a silent skip: without a GPU, tests/conftest.py must have put Triton in interpreter mode
    raise RuntimeError('Triton kernels need CUDA, or TRITON_INTERPRET=1 set before Triton is imported '
                       '(tests/conftest.py)')

fused = ops.super_token_clustering_triton

# Per-dtype tolerances (rtol, atol) on outputs and gradients of O(1) randn inputs. fp32: both paths
# compute in fp32 and differ only in summation order (observed ≤ 1e-6). fp16/bf16: both paths compute
# in fp32 and round once to the input dtype, so they may differ by one rounding step of that dtype:
# 2^-10 (fp16) and 2^-7 (bf16) relative to values up to ~2, allowed twice.
TOL = {
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3.2e-2),
}


def _forward_backward(fn, x, grid, iters, gen_seed=1):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, grid, iters)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(gen_seed)).to(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    return y, dx


def _assert_matches_reference(shape, grid, iters, dtype=torch.float32, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)
    y, dx = _forward_backward(fused, x, grid, iters)
    y_ref, dx_ref = _forward_backward(super_token_clustering, x, grid, iters)
    assert y.dtype == dtype and dx.dtype == dtype
    assert y.shape == y_ref.shape and dx.shape == x.shape
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx, dx_ref, rtol=rtol, atol=atol)


# (B, C, H, W, grid, iters): every grid and iteration count, H ≠ W, sizes that are not multiples of
# the grid (ragged border cells), a 1×1 super-token map, C not a power of two and C = 512.
CASES = [
    (2, 8, 7, 9, 2, 3),
    (1, 5, 6, 4, 1, 2),
    (2, 12, 11, 10, 3, 1),
    (1, 20, 13, 9, 4, 4),
    (3, 16, 5, 8, 2, 4),
    (1, 3, 3, 2, 4, 2),  # one super token: the whole map is a single, partial cell
    (1, 512, 4, 6, 2, 2),
    (1, 384, 3, 5, 1, 1),
]


@pytest.mark.parametrize('B,C,H,W,grid,iters', CASES)
def test_matches_reference_fp32(B, C, H, W, grid, iters):
    _assert_matches_reference((B, C, H, W), grid, iters)


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('B,C,H,W,grid,iters', [(2, 24, 9, 7, 2, 3), (1, 64, 6, 10, 3, 2)])
def test_matches_reference_half(B, C, H, W, grid, iters, dtype):
    _assert_matches_reference((B, C, H, W), grid, iters, dtype=dtype)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(
    B=hs.integers(1, 2), C=hs.integers(1, 40), H=hs.integers(1, 10), W=hs.integers(1, 10),
    grid=hs.integers(1, 4), iters=hs.integers(1, 4),
    dtype=hs.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_matches_reference_property(B, C, H, W, grid, iters, dtype):
    _assert_matches_reference((B, C, H, W), grid, iters, dtype=dtype, seed=B * 1000 + C)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('kernel,config', [
    pytest.param(kernel, config, id=f'{kernel.fn.__name__}-{config}'.replace(' ', ''))
    for kernel in st.AUTOTUNED_KERNELS for config in kernel.configs])
def test_every_autotune_config_matches_reference(kernel, config, dtype, monkeypatch):
    """Each config an autotuner may pick, forced: the other tests run one config per kernel and shape (the
    interpreter's, or with autotuning off on a GPU, tests/conftest.py)."""
    monkeypatch.setattr(kernel, 'configs', [config])
    monkeypatch.setattr(st, '_KNOWN_LAUNCHES', {})  # else a launch seen before keeps the config chosen then
    _assert_matches_reference((2, 24, 9, 7), 2, 2, dtype=dtype)


def test_host_integer_helpers_match_triton():
    """The launch plans' cdiv and next_power_of_2 are Triton's, without the constexpr wrapper's host cost."""
    for a in range(1, 300):
        assert st.next_power_of_2(a) == triton.next_power_of_2(a)
        for b in (1, 2, 3, 7, 16, 64):
            assert st.cdiv(a, b) == triton.cdiv(a, b)


def test_seen_launch_skips_the_autotuner_and_runs_its_choice(monkeypatch):
    """A launch the autotuners have seen runs the config they chose without going through them again."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(st, '_KNOWN_LAUNCHES', {})
    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(12)).to(DEVICE)
    first = fused(x, 2, 3)
    chosen = {kernel: kernel.best_config for kernel in st.AUTOTUNED_KERNELS[:2]}
    through_autotuner = []
    run = Autotuner.run
    monkeypatch.setattr(Autotuner, 'run', lambda self, *a, **k: through_autotuner.append(self) or run(self, *a, **k))
    for kernel in chosen:
        monkeypatch.setattr(kernel, 'best_config', None)
    assert torch.equal(fused(x, 2, 3), first)
    assert through_autotuner == []
    assert {kernel: kernel.best_config for kernel in chosen} == chosen


def test_seen_launch_runs_its_compiled_kernel_without_the_jit(monkeypatch):
    """On a GPU with a Triton whose launcher convention is known (3.6-3.8) a seen launch runs the kernel compiled for
    it without Triton's JIT, with bitwise the same result; in the interpreter, which compiles nothing, and on other
    Tritons every launch goes through the JIT."""
    monkeypatch.setattr(st, '_KNOWN_LAUNCHES', {})
    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(13)).to(DEVICE)
    first = fused(x, 2, 3)
    through_jit = _count_jit_launches(monkeypatch)
    assert torch.equal(fused(x, 2, 3), first)
    direct = [known for known in st._KNOWN_LAUNCHES.values() if known.launch is not None]
    forward_launches = 1 + 2 * 3
    if st.DIRECT_LAUNCH:
        assert through_jit == [] and len(direct) == forward_launches
    else:
        assert direct == [] and len(through_jit) == forward_launches


def _count_jit_launches(monkeypatch):
    """The JIT functions launched through Triton's JIT from now on (the class the kernels are built as, compiled or
    interpreted), one entry per launch."""
    through_jit = []
    jit_class = type(st._cell_mean_kernel)
    run = jit_class.run
    monkeypatch.setattr(jit_class, 'run', lambda self, *a, **k: through_jit.append(self) or run(self, *a, **k))
    return through_jit


def test_fused_op_falls_back_to_the_jit_where_the_launcher_differs(monkeypatch):
    """A compiled kernel without the launcher attributes the fast path reads (a Triton whose internals moved) is
    launched through the JIT, every time, with bitwise the same results; nothing fails."""
    x = torch.randn(2, 16, 6, 8, generator=torch.Generator().manual_seed(14)).to(DEVICE)
    expected = _forward_backward(fused, x, 2, 3)
    monkeypatch.setattr(st, '_KNOWN_LAUNCHES', {})
    monkeypatch.setattr(compat, '_LAUNCHER_ATTRIBUTES', ('run', 'function', 'packed_metadata', 'moved_away'))
    monkeypatch.setattr(st, 'DIRECT_LAUNCH', True)  # asked for, also in the interpreter (which compiles nothing)
    first = _forward_backward(fused, x, 2, 3)
    through_jit = _count_jit_launches(monkeypatch)
    again = _forward_backward(fused, x, 2, 3)
    assert all(known.launch is None for known in st._KNOWN_LAUNCHES.values())
    assert len(through_jit) == 1 + 2 * 3 + 1  # the forward's launches and the backward's, all through the JIT
    for got in (first, again):
        assert all(torch.equal(a, b) for a, b in zip(got, expected))


class _CompiledKernel:
    """What `direct_launcher` reads off a compiled kernel, recording the launcher's calls."""
    def __init__(self):
        self.function, self.packed_metadata, self.calls = 'function', 'metadata', []

    def run(self, *args):
        self.calls.append(args)


def test_direct_launcher_is_taken_only_where_the_launcher_is_known(monkeypatch):
    monkeypatch.setattr(compat, '_current_stream', lambda device: f'stream of {device}')
    monkeypatch.setattr(compat, 'DIRECT_LAUNCH_TRITON', True)
    kernel = _CompiledKernel()
    compat.direct_launcher(kernel)((4, 2), 0, 'x', 3, 'BLOCK')
    # the call Triton 3.6-3.8's JIT makes: grid padded to 3-D, no launch metadata or hooks, then every argument
    assert kernel.calls == [(4, 2, 1, 'stream of 0', 'function', 'metadata', None, None, None, 'x', 3, 'BLOCK')]
    del kernel.packed_metadata
    assert compat.direct_launcher(kernel) is None  # internals that moved: the JIT launches it
    assert compat.direct_launcher(None) is None  # what the interpreter returns
    monkeypatch.setattr(compat, 'DIRECT_LAUNCH_TRITON', False)
    assert compat.direct_launcher(_CompiledKernel()) is None  # another Triton: the JIT launches it


def test_direct_launch_passes_the_arguments_tritons_jit_passes():
    """What a seen launch hands the compiled kernel, its positional arguments then `_signature_tail`, is what Triton's
    JIT binds and hands it (`bound_args.values()`), for every launch of the fused op: bound on CPU by the binder
    Triton generates from each kernel's signature. Its grid comes from the constexprs and config alone."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    x = torch.randn(2, 16, 6, 8).contiguous(memory_format=torch.channels_last)
    forward, (s, aff, inv_norm) = st.forward_plan(x, 2, 3)
    launches = forward + st.backward_plan(torch.randn_like(s), aff, inv_norm, 2)[0]
    backend = CUDABackend(GPUTarget('cuda', 90, 32))
    for launch in launches:
        kernel = launch.kernel
        config = kernel.configs[0] if isinstance(kernel, st.Autotuner) else None
        fn = (kernel.fn if config else kernel).fn  # the Python function under the JIT or the interpreter
        kwargs = {**launch.constexprs, **(config.all_kwargs() if config else {})}
        jit = JITFunction(fn)
        bound, _, _ = create_function_from_signature(jit.signature, jit.params, backend)(*launch.args, **kwargs)
        direct = (*launch.args, *st._signature_tail(jit, launch.args, kwargs))
        assert len(direct) == len(bound) and all(a is b for a, b in zip(direct, bound.values())), fn.__name__
        assert all(isinstance(n, int) and n > 0 for n in launch.grid(kwargs))  # the grid from the constexprs alone


def test_hooked_launches_keep_the_jit(monkeypatch):
    """A profiler's launch hook (Triton's proton sets one) sees every launch: with one set, none goes around the JIT.
    Triton 3.6 holds a hook as a function or None, 3.8 as a chain of them."""
    if not st.DIRECT_LAUNCH_TRITON:  # no direct launches on this Triton to keep a hook from
        assert not st.DIRECT_LAUNCH
        return
    runtime = triton.knobs.runtime
    assert not compat.launch_hooks_set()
    hook = lambda *args: None  # noqa: E731
    if hasattr(runtime.launch_exit_hook, 'add'):
        runtime.launch_exit_hook.add(hook)
        try:
            assert compat.launch_hooks_set()
        finally:
            runtime.launch_exit_hook.remove(hook)
    else:
        monkeypatch.setattr(runtime, 'launch_exit_hook', hook)
        assert compat.launch_hooks_set()
    # a Triton that keeps its hooks elsewhere: assume one is set
    monkeypatch.setattr(compat, 'triton', SimpleNamespace(knobs=SimpleNamespace(runtime=SimpleNamespace())))
    assert compat.launch_hooks_set()


def test_launch_key_separates_what_triton_compiles_apart():
    """Launches with one key run one compiled kernel, so the key must tell apart every argument Triton's JIT
    specialises differently (dtype, 16-byte alignment, an int's 1 / multiple of 16 / width), checked against
    Triton's own specialisation on tensors at every offset and ints around each boundary."""
    if not st.DIRECT_LAUNCH_TRITON:  # no direct launches on this Triton, so no key to check against it
        assert not st.DIRECT_LAUNCH
        return
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    storage = torch.zeros(64)
    args = [storage.to(dtype)[offset:] for dtype in (torch.float32, torch.bfloat16, torch.float16)
            for offset in range(9)]
    args += [v + d for v in (0, 16, 2 ** 31, 2 ** 63) for d in (-1, 0, 1)] + [1, 2, 0.5, 1.0, True, False, None]
    specialisations = {}
    for arg in args:
        spec = native_specialize_impl(BaseBackend, arg, False, True, True)
        assert specialisations.setdefault(st._arg_key(arg), spec) == spec, arg


def test_lone_config_is_not_timed():
    """With autotuning off a kernel keeps one config, and the autotuner's timing of it launches nothing."""
    launches = []
    with use_autotune(False):
        assert st._time_config(lambda: launches.append(1), quantiles=(0.5, 0.2, 0.8)) == [0.0, 0.0, 0.0]
    assert launches == []


def test_matches_loop_reference():
    """Against the pixel-by-pixel transcription of the spec, not only the vectorised reference."""
    x = torch.randn(1, 6, 5, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    y, dx = _forward_backward(fused, x.float().to(DEVICE), 2, 3)
    y_loop, dx_loop = _forward_backward(super_token_clustering_loop, x, 2, 3)
    torch.testing.assert_close(y.double().cpu(), y_loop, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx.double().cpu(), dx_loop, rtol=1e-4, atol=1e-5)


def test_bitwise_deterministic():
    x = torch.randn(1, 24, 7, 9, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    y1, dx1 = _forward_backward(fused, x, 2, 3)
    y2, dx2 = _forward_backward(fused, x, 2, 3)
    assert torch.equal(y1, y2) and torch.equal(dx1, dx2)


def test_channels_last_input():
    """The kernels run channels_last: NHWC input is read in place, NCHW converted, with bit-identical results."""
    x = torch.randn(1, 16, 7, 6, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    x_cl = x.to(memory_format=torch.channels_last)
    assert not x_cl.is_contiguous()
    y, dx = _forward_backward(fused, x, 2, 2)
    y_cl, dx_cl = _forward_backward(fused, x_cl, 2, 2)
    assert torch.equal(y, y_cl) and torch.equal(dx, dx_cl)
    assert y.is_contiguous(memory_format=torch.channels_last) and dx.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y_cl, super_token_clustering(x_cl, 2, 2), rtol=1e-4, atol=1e-5)


def test_module_backend_triton():
    x = torch.randn(1, 8, 6, 5, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    module = SuperTokenClustering(grid=2, iters=3, backend='triton')
    assert 'backend=triton' in repr(module)
    torch.testing.assert_close(module(x), super_token_clustering(x, 2, 3), rtol=1e-4, atol=1e-5)


BAD_INPUTS = [
    (lambda: torch.randn(1, 4, 4, 4), 0, 1, ValueError, 'grid must be >= 1'),
    (lambda: torch.randn(1, 4, 4, 4), 2, 0, ValueError, 'iterations t must be >= 1'),
    (lambda: torch.randn(4, 4, 4), 2, 1, ValueError, r'expects a \(B, C, H, W\) feature map'),
    (lambda: torch.ones(1, 4, 4, 4, dtype=torch.int64), 2, 1, TypeError, 'floating-point'),
    (lambda: torch.zeros(0, 4, 4, 4), 2, 1, ValueError, 'empty feature map'),
    (lambda: torch.full((1, 4, 4, 4), float('nan')), 2, 1, ValueError, 'NaN or Inf'),
    (lambda: torch.full((1, 4, 4, 4), float('inf')), 2, 1, ValueError, 'NaN or Inf'),
]


def super_token_clustering_checked(x, grid, iters):
    """The reference path with every input check, the NaN/Inf scan included, then the reference function."""
    check_super_token_input(x, grid, iters)
    check_finite(x)
    return super_token_clustering(x, grid, iters)


@pytest.mark.parametrize('make,grid,iters,error,message', BAD_INPUTS)
def test_bad_inputs_same_error_as_reference(make, grid, iters, error, message):
    x = make().to(DEVICE)
    with pytest.raises(error, match=message) as ref_error:
        super_token_clustering_checked(x, grid, iters)
    with pytest.raises(error, match=message) as fused_error:
        fused(x, grid, iters)
    assert str(fused_error.value) == str(ref_error.value)
    if grid >= 1 and iters >= 1:
        with use_check_finite(True), pytest.raises(error, match=message):  # the fused path scans on request
            SuperTokenClustering(grid, iters, backend='triton')(x)


def test_unsupported_for_fused():
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="backend='reference'"):
        fused(x, 2, 1)
    with pytest.raises(ValueError, match='grid <= 4'):
        fused(x.float(), 5, 1)


def test_cpu_tensor_outside_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(st, 'INTERPRET', False)
    with pytest.raises(RuntimeError, match='needs a CUDA tensor'):
        fused(torch.randn(1, 4, 4, 4), 2, 1)


def test_dispatch(monkeypatch):
    calls = []
    original = st.super_token_clustering_triton

    def spy(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(st, 'super_token_clustering_triton', spy)  # where the layer looks it up
    x = torch.randn(1, 4, 4, 4, device=DEVICE)
    with use_backend('auto'):
        SuperTokenClustering()(x.cpu())  # auto: a CPU tensor takes the reference path
        assert not calls
        if DEVICE == 'cuda':
            SuperTokenClustering()(x)  # ... and a CUDA tensor the fused one
            assert len(calls) == 1
            calls.clear()
    with use_backend('triton'):  # the process-wide setting decides for 'auto' modules ...
        SuperTokenClustering()(x)
        assert len(calls) == 1
        SuperTokenClustering(backend='reference')(x)  # ... but not for an explicit backend
        assert len(calls) == 1
    torch.jit.script(SuperTokenClustering(backend='triton'))(x)  # TorchScript: always the reference
    torch.export.export(SuperTokenClustering(backend='triton'), (x,))
    assert len(calls) == 1
    with pytest.raises(ValueError, match='backend must be one of'):
        set_backend('cuda')
    with pytest.raises(ValueError, match='backend must be one of'):
        SuperTokenClustering(backend='cuda')


@pytest.mark.parametrize('op', [
    pytest.param(lambda x, g, t: fused(x, g, t, validate=False), id='eager-function'),
    pytest.param(lambda x, g, t: torch.ops.timm_supertoken.super_token_clustering(x, g, t)[0], id='custom-op')])
def test_backward_gets_no_zero_gradients_for_a_and_z(op):
    """A and 1/Z are outputs without a gradient (of the custom op; the eager Function does not return them):
    autograd hands the backward None for them, not zero tensors."""

    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(10)).to(DEVICE).requires_grad_(True)
    torch.autograd.grad(op(x, 2, 2).sum(), x)  # a new shape's first call may autotune, and timing zeroes buffers
    y = op(x, 2, 2)
    with OpRecorder() as recorder:
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    ran = {func.overloadpacket.__name__ for func in recorder.ops}
    assert not {'zeros', 'zeros_like', 'zero_', 'fill_'} & ran, ran
    torch.testing.assert_close(dx, torch.autograd.grad(super_token_clustering(x, 2, 2), x, torch.ones_like(y))[0],
                               rtol=1e-4, atol=1e-5)


def test_torch_compile_no_graph_break():
    """fullgraph=True fails on a graph break: the custom op, its fake and its autograd are traceable."""
    x = torch.randn(1, 8, 6, 7, generator=torch.Generator().manual_seed(7)).to(DEVICE)
    compiled = torch.compile(lambda t, g, i: fused(t, g, i, validate=False), fullgraph=True, backend='aot_eager')
    y, dx = _forward_backward(compiled, x, 2, 2)
    y_eager, dx_eager = _forward_backward(fused, x, 2, 2)
    assert torch.equal(y, y_eager) and torch.equal(dx, dx_eager)


def test_opcheck():
    x = torch.randn(1, 4, 3, 5, generator=torch.Generator().manual_seed(8)).to(DEVICE).requires_grad_(True)
    torch.library.opcheck(
        torch.ops.timm_supertoken.super_token_clustering.default, (x, 2, 2),
        test_utils=('test_schema', 'test_autograd_registration', 'test_faketensor'))


@pytest.mark.parametrize('checked', [False, True])
def test_fused_forward_reads_nothing_back(checked):
    """The module's fused forward makes no host sync (capturable in a CUDA graph) unless a NaN scan is asked for."""
    x = torch.randn(1, 8, 6, 6, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    module = SuperTokenClustering(grid=2, iters=2, backend='triton')
    with use_check_finite(True if checked else None), HostSyncRecorder() as recorder:
        module(x)
    assert bool(recorder.calls) == checked, recorder.calls
