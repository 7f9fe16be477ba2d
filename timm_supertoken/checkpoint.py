"""Reading PyTorch checkpoint files: one reader with one safety rule, used by every command that opens one.

The rule: `torch.load(weights_only=True)`, which rebuilds tensors and plain containers and so cannot run code
from the file, plus the few data-only types our readers meet in practice: `argparse.Namespace` (timm
train.py stores its arguments as one) and NumPy arrays, dtypes and scalars (metrics kept in resumable
checkpoints, NumPy RNG states). Anything else is unpickled only when the caller passes `trust_pickle=True`
(`--trust-pickle` on the command line). Whatever goes wrong, the error is one line that names the file.
"""
import argparse
import pickle
import warnings
from pathlib import Path
from typing import Any, Callable, List, Union

import numpy as np
import torch

__all__ = ['CheckpointError', 'load_checkpoint']

_multiarray = np._core.multiarray if hasattr(np, '_core') else np.core.multiarray  # NumPy 2 renamed numpy.core

_NUMERIC_DTYPE_CLASSES = [type(np.dtype(code)) for code in np.typecodes['AllInteger'] + np.typecodes['AllFloat'] + '?']

# data-only classes and constructors allowed on top of weights_only's tensors and containers
SAFE_GLOBALS: List[Callable] = [
    argparse.Namespace, np.ndarray, np.dtype, *_NUMERIC_DTYPE_CLASSES, _multiarray._reconstruct, _multiarray.scalar,
]


class CheckpointError(ValueError):
    """A weights file, config or Hub repo that cannot be used; the message names the file and the problem."""


def _first_line(error: BaseException) -> str:
    """An exception as one line, with its type when the message alone would be empty or cryptic."""
    message = str(error).strip().splitlines()
    return f'{type(error).__name__}: {message[0]}' if message else type(error).__name__


def _unsafe_globals(path: Path) -> List[str]:
    """The pickle globals the safe rule refuses, to tell a needs-trust file from a damaged one (empty then)."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a damaged file: the caller reports the load error itself
        return []
    allowed = {f'{g.__module__}.{g.__qualname__}' for g in SAFE_GLOBALS}
    return [name for name in unsafe if name not in allowed]


def load_checkpoint(path: Union[str, Path], map_location: Any = 'cpu', trust_pickle: bool = False) -> Any:
    """`torch.load` under the rule above; raises CheckpointError naming `path` for any file it cannot read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f'{path}: no such file')
    if path.stat().st_size == 0:
        raise CheckpointError(f'{path}: the file is empty')
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # damaged bytes can look like an unusual pickle protocol: the error below says enough
            warnings.filterwarnings('ignore', message='Detected pickle protocol')
            return torch.load(path, map_location=map_location, weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        unsafe = [] if trust_pickle else _unsafe_globals(path)
        if unsafe:
            raise CheckpointError(
                f'{path}: refusing to unpickle it: torch.load(weights_only=True) cannot load it because it '
                f'references Python objects beyond tensors and plain containers ({", ".join(unsafe)}). '
                f'Prefer a .safetensors file; if you trust this file, pass --trust-pickle (trust_pickle=True).'
            ) from e
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({_first_line(e)})') from e
    except Exception as e:  # unpickling damaged bytes can fail with almost any exception type
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({_first_line(e)})') from e
