"""What the commands and benchmarks share beyond the run harness (`harness.py`).

Model creation at an input size, cuDNN's algorithm search, headless figures, and the description of the
machine that every reported number is printed with.
"""
import os
import platform
from typing import Any, Dict

import torch
from torch import nn

import timm

__all__ = ['cpu_name', 'hardware_info', 'headless_pyplot', 'create_model_at_size', 'use_cudnn_benchmark']


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


def use_cudnn_benchmark() -> None:
    """Let cuDNN time its convolution algorithms once per input shape and keep the fastest, as timm's train.py does.

    Training, clustering and the benchmarks feed the convolutions fixed shapes, so the timing is paid once per
    shape; otherwise every conv runs cuDNN's heuristic pick, which need not be the fastest for the stem's
    small-channel convolutions. Results stay as reproducible as a GPU run was: the fastest algorithm can
    differ between runs, and several were never bitwise deterministic.
    """
    torch.backends.cudnn.benchmark = True
