"""Plumbing shared by the training and deep-clustering loops and the commands.

Model creation, process groups, RNG state, checkpoints, progress, and the description of the machine that
every reported number is printed with.
"""
import os
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

import timm

__all__ = ['cpu_name', 'hardware_info', 'create_model_at_size', 'setup_distributed', 'shard_range', 'rng_state',
           'set_rng_state', 'seed_everything', 'use_cudnn_benchmark', 'save_atomic', 'on_terminal', 'progress']


def cpu_name() -> str:
    """The CPU model, so published numbers say which machine they came from."""
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what the platform module knows
    return platform.processor() or platform.machine() or 'unknown CPU'


def hardware_info() -> Dict[str, str]:
    """Hardware and software versions that a throughput figure is meaningless without."""
    return {
        'cpu': cpu_name(),
        'cores': str(os.cpu_count()),
        'threads': str(torch.get_num_threads()),
        'torch': torch.__version__,
        'timm': timm.__version__,
        'python': platform.python_version(),
        'os': platform.platform(terse=True),
    }


def headless_pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: the commands only write image files, and need no display."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    return plt


def create_model_at_size(name: str, img_size: int, **kwargs: Any) -> nn.Module:
    """timm.create_model at img_size for models that take one (ViTs); CNNs, which take any size, get no img_size."""
    try:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as e:
            if 'img_size' not in str(e):
                raise
            return timm.create_model(name, **kwargs)
    except TypeError as e:
        if 'unexpected keyword argument' not in str(e):
            raise
        # a misspelt or foreign kwarg: name it and the model, instead of a traceback through timm's builders
        raise ValueError(f'unknown keyword argument {str(e).rpartition("argument ")[2]} for model {name}') from e


def setup_distributed(device: str = 'auto') -> Tuple[int, int, torch.device]:
    """(rank, world size, device); joins the process group when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    dev = torch.device(device)
    if dev.type == 'cuda' and dev.index is None:
        dev = torch.device('cuda', local_rank)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo')
    return rank, world, dev


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Contiguous [start, stop) of rank's share of n items; shares are equal up to one item."""
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


def rng_state() -> Dict[str, Any]:
    """Every global RNG's state, so a resumed run continues the same random streams."""
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def use_cudnn_benchmark() -> None:
    """Let cuDNN time its convolution algorithms once per input shape and keep the fastest, as timm's train.py does.

    Training, clustering and the benchmarks feed the convolutions fixed shapes, so the timing is paid once per
    shape; otherwise every conv runs cuDNN's heuristic pick, which need not be the fastest for the stem's
    small-channel convolutions. Results stay as reproducible as a GPU run was: the fastest algorithm can
    differ between runs, and several were never bitwise deterministic.
    """
    torch.backends.cudnn.benchmark = True


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), NumPy and Python's `random`, which timm's augmentations and Mixup draw from."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through a temporary file and rename, so a kill mid-write leaves the previous checkpoint intact."""
    tmp = path.with_suffix('.tmp')
    torch.save(obj, tmp)
    os.replace(tmp, path)


class _LineProgress:
    """A loop's progress as one line when it ends: for logs and pipes, where a bar's carriage returns pile up."""

    def __init__(self, iterable: Iterable[Any], desc: str):
        self.iterable, self.desc, self.postfix = iterable, desc, {}

    def __iter__(self) -> Iterator[Any]:
        start, steps = time.perf_counter(), 0
        for steps, item in enumerate(self.iterable, 1):
            yield item
        seconds = time.perf_counter() - start
        extra = ''.join(f', {k} {v}' for k, v in self.postfix.items())
        print(f'{self.desc}: {steps} steps in {seconds:.1f} s ({steps / max(seconds, 1e-9):.2f} steps/s){extra}',
              file=sys.stderr, flush=True)

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        """Remembered for the closing line (tqdm's signature)."""
        self.postfix = values


def on_terminal() -> bool:
    """Whether progress shows live (stderr is a terminal) rather than as log lines."""
    return sys.stderr.isatty()


def progress(iterable: Iterable[Any], desc: str, enabled: bool = True, summary: bool = True) -> Iterable[Any]:
    """A tqdm bar on a terminal; off one (a log file, CI), one line when the loop ends, or none without summary.

    Callers that log their own line per epoch pass summary=False. Either way the result takes set_postfix.
    """
    if not enabled or (not summary and not on_terminal()):
        return tqdm(iterable, disable=True)
    if on_terminal():
        return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)
    return _LineProgress(iterable, desc)
