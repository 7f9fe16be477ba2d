"""Every Triton internal the fused ops and the kernel report use, each checked, with a public fallback.

Fast path (direct launches of seen kernels): Triton 3.6-3.8 on CUDA; other versions launch through the JIT.
Triton's public API has no way to re-launch a compiled kernel without its JIT (which binds and looks up every
argument again, the larger part of a launch's host time), nor to compile for a GPU that is not there. So:

- `direct_launcher` hands out the compiled kernel's own launcher, called as Triton's JIT calls it, only on
  the versions whose JIT was read to make that call and where the kernel has the attributes it needs;
  elsewhere it returns None and the op launches through the public `kernel[grid](...)`.
- `launch_hooks_set` says whether a profiler hooks launches; where it cannot tell, it says yes, which
  also keeps launches on the JIT.
- `compile_for_target` compiles for an absent GPU (the kernel report). It has no public fallback: on a
  Triton whose compiler internals differ it fails with an error naming what is missing.
"""
import contextlib
import io
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import triton

__all__ = ['DIRECT_LAUNCH_TRITON', 'TRITON_VERSION', 'TargetKernel', 'compile_for_target', 'cuobjdump_path',
           'direct_launcher', 'is_interpreted', 'kernel_arg_names', 'launch_hooks_set', 'ptxas_path',
           'pruned_configs']

TRITON_VERSION: Tuple[int, int] = tuple(int(v) for v in re.match(r'(\d+)\.(\d+)', triton.__version__).groups())
# The versions whose JIT launches a compiled kernel as `run(gx, gy, gz, stream, function, packed_metadata,
# launch_metadata, enter_hook, exit_hook, *every argument in signature order, constexprs included)`: read in
# the source of 3.6 and 3.8, run on a GPU with 3.6 (docs/kernels.md).
DIRECT_LAUNCH_TRITON: bool = (3, 6) <= TRITON_VERSION <= (3, 8)
# what `direct_launcher` reads off a compiled kernel
_LAUNCHER_ATTRIBUTES = ('run', 'function', 'packed_metadata')


def is_interpreted(kernel: Any) -> bool:
    """Whether `@triton.jit` built `kernel` for Triton's interpreter (TRITON_INTERPRET=1 when Triton loaded)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return os.environ.get('TRITON_INTERPRET', '0').lower() in ('1', 'true', 'on')
    return isinstance(kernel, InterpretedFunction)


def _current_stream(device: int) -> Any:
    return triton.runtime.driver.active.get_current_stream(device)


def direct_launcher(compiled: Any) -> Optional[Callable[..., None]]:
    """`launch(grid, device, *arguments)` through `compiled`'s own launcher, or None: launch through the JIT.

    `compiled` is what `kernel[grid](...)` returned (None in the interpreter). `arguments` are all the
    kernel's parameters in signature order, constexprs included, as the JIT hands them over.
    """
    if not DIRECT_LAUNCH_TRITON or compiled is None:
        return None
    try:
        run, function, metadata = (getattr(compiled, name) for name in _LAUNCHER_ATTRIBUTES)
    except AttributeError:
        return None

    def launch(grid: Tuple[int, ...], device: int, *arguments: Any) -> None:
        run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1, _current_stream(device),
            function, metadata, None, None, None, *arguments)

    return launch


def launch_hooks_set() -> bool:
    """Whether something (a profiler such as Triton's proton) hooks launches, so that they must keep the JIT.

    A hook is a function or None (Triton 3.6), or a chain of them that may be empty (3.8). Without
    `triton.knobs.runtime` (before 3.4) the answer is yes: the JIT runs any hook there is.
    """
    runtime = getattr(getattr(triton, 'knobs', None), 'runtime', None)
    if runtime is None or not hasattr(runtime, 'launch_enter_hook') or not hasattr(runtime, 'launch_exit_hook'):
        return True
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    return bool(getattr(enter, 'calls', enter)) or bool(getattr(leave, 'calls', leave))


def kernel_arg_names(jit: Any) -> Optional[Sequence[str]]:
    """A JIT function's parameter names in signature order, or None where it does not list them."""
    names = getattr(jit, 'arg_names', None)
    return names if isinstance(names, (list, tuple)) else None


def pruned_configs(autotuner: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Sequence[triton.Config]:
    """The configs an autotuner keeps for these arguments: its `early_config_prune`, or all of them."""
    prune = getattr(autotuner, 'early_config_prune', None)
    if prune is None:
        return autotuner.configs
    return prune(autotuner.configs, dict(zip(autotuner.arg_names, args)), **kwargs)


@dataclass(frozen=True)
class TargetKernel:
    """A kernel compiled for an absent GPU: what the kernel report reads off it."""
    name: str
    hash: str
    cubin: bytes
    num_warps: int
    shared_bytes: int
    ptxas_log: str  # `ptxas -v`: registers, stack, spills


_TARGET_KERNELS: Dict[Tuple, TargetKernel] = {}  # one compile per distinct specialisation


def compile_for_target(jit: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any], arch: int) -> TargetKernel:
    """Compile one launch for sm_`arch` exactly as `jit[grid](*args, **kwargs)` would on that GPU, with no GPU.

    The arguments are specialised by the binder Triton's JIT generates (16-byte pointer alignment, integers
    divisible by 16 or equal to 1), and the ptxas bundled in the wheel reports what it allocated.
    """
    try:
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.backends.nvidia.compiler import CUDABackend
        from triton.compiler import ASTSource
        from triton.runtime.jit import create_function_from_signature
        target = GPUTarget('cuda', arch, 32)
        backend = CUDABackend(target)
        binder = create_function_from_signature(jit.signature, jit.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound, specialization, options)
    except (ImportError, AttributeError, TypeError) as e:
        raise RuntimeError(f'compiling for an absent GPU uses the compiler internals of Triton 3.6-3.8, which '
                           f'Triton {triton.__version__} does not have: {e}') from e
    key = (jit.fn, arch, repr(signature), repr(constexprs), repr(attrs), repr(options))
    if key not in _TARGET_KERNELS:
        log = io.StringIO()
        with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
            knobs.nvidia.dump_ptxas_log = True  # ptxas -v, printed to stdout
            knobs.compilation.always_compile = True  # a cached kernel would come back without its log
            kernel = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        _TARGET_KERNELS[key] = TargetKernel(kernel.name, kernel.hash, kernel.asm['cubin'], kernel.metadata.num_warps,
                                            kernel.metadata.shared, log.getvalue())
    return _TARGET_KERNELS[key]


def cuobjdump_path() -> str:
    """The cuobjdump bundled with Triton's NVIDIA backend."""
    from triton import knobs
    return knobs.nvidia.cuobjdump.path


def ptxas_path() -> str:
    """The ptxas bundled with Triton's NVIDIA backend."""
    from triton import knobs
    return knobs.nvidia.ptxas.path
