"""Runtime settings of the super-token layers and their fused kernels, in the manner of `timm.layers.config`.

Each setting starts from its environment variable, read once when this module is imported, and can be
changed at run time with its `set_*` function (for the rest of the process) or its `use_*` context
manager (for a block). The layers read the setting on each call, never the environment:

    TIMM_SUPERTOKEN_BACKEND       auto (default) | reference | triton
        the path of modules built with backend='auto': 'auto' takes the fused Triton kernels for CUDA
        tensors they support, 'reference' the plain PyTorch ops everywhere, 'triton' the kernels always.
    TIMM_SUPERTOKEN_AUTOTUNE      1 (default) | 0
        1 times every fitting config of an autotuned kernel at each new shape; 0 takes the first one
        (one compile per kernel and shape, no timing runs). Shapes already launched keep their config.
    TIMM_SUPERTOKEN_CHECK_FINITE  unset (default) | 1 | 0
        the NaN/Inf scan of the clustering's input: by default only where it is free (the reference
        path on CPU), since elsewhere it syncs the host and breaks CUDA-graph capture; 1 everywhere
        (hunting a NaN), 0 nowhere.

A variable with any other value fails the import, naming the variable.
"""
import contextlib
import os
from typing import Iterator, Optional, Sequence

__all__ = [
    'BACKENDS', 'get_backend', 'set_backend', 'use_backend',
    'is_autotune_enabled', 'set_autotune', 'use_autotune',
    'get_check_finite', 'set_check_finite', 'use_check_finite',
]

BACKENDS = ('auto', 'reference', 'triton')
BACKEND_ENV = 'TIMM_SUPERTOKEN_BACKEND'
AUTOTUNE_ENV = 'TIMM_SUPERTOKEN_AUTOTUNE'
CHECK_FINITE_ENV = 'TIMM_SUPERTOKEN_CHECK_FINITE'


def _from_env(name: str, choices: Sequence[str], default: str) -> str:
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f'${name} must be one of {tuple(choices)}, got {value!r}')
    return value


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f'super-token backend must be one of {BACKENDS}, got {backend!r}')
    return backend


_BACKEND: str = _from_env(BACKEND_ENV, BACKENDS, 'auto')
_AUTOTUNE: bool = _from_env(AUTOTUNE_ENV, ('0', '1'), '1') == '1'
_CHECK_FINITE: Optional[bool] = {'': None, '1': True, '0': False}[_from_env(CHECK_FINITE_ENV, ('', '0', '1'), '')]


def get_backend() -> str:
    """The path that modules built with backend='auto' take: 'auto', 'reference' or 'triton'."""
    return _BACKEND


def set_backend(backend: str) -> None:
    """Set the path of modules built with backend='auto' (see the module docstring)."""
    global _BACKEND
    _BACKEND = _check_backend(backend)


@contextlib.contextmanager
def use_backend(backend: str) -> Iterator[None]:
    """`set_backend` for the block, then back to the previous setting."""
    previous = get_backend()
    set_backend(backend)
    try:
        yield
    finally:
        set_backend(previous)


def is_autotune_enabled() -> bool:
    """Whether a new shape times every fitting config of an autotuned kernel (True) or takes the first."""
    return _AUTOTUNE


def set_autotune(enable: bool = True) -> None:
    """Turn autotuning of the kernels at new shapes on or off."""
    global _AUTOTUNE
    _AUTOTUNE = bool(enable)


@contextlib.contextmanager
def use_autotune(enable: bool) -> Iterator[None]:
    """`set_autotune` for the block, then back to the previous setting."""
    previous = is_autotune_enabled()
    set_autotune(enable)
    try:
        yield
    finally:
        set_autotune(previous)


def get_check_finite() -> Optional[bool]:
    """The NaN/Inf scan: True everywhere, False nowhere, None only where it is free (the default)."""
    return _CHECK_FINITE


def set_check_finite(enable: Optional[bool]) -> None:
    """Scan the clustering's input for NaN/Inf everywhere (True), nowhere (False) or where free (None)."""
    global _CHECK_FINITE
    if enable is not None and not isinstance(enable, bool):
        raise TypeError(f'the NaN/Inf check setting is True, False or None, got {enable!r}')
    _CHECK_FINITE = enable


@contextlib.contextmanager
def use_check_finite(enable: Optional[bool]) -> Iterator[None]:
    """`set_check_finite` for the block, then back to the previous setting."""
    previous = get_check_finite()
    set_check_finite(enable)
    try:
        yield
    finally:
        set_check_finite(previous)
