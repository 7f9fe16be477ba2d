"""Model-creation, process-group, RNG and checkpoint plumbing shared by the training and deep-clustering loops."""
import os
import random
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import timm

__all__ = ['create_model_at_size', 'setup_distributed', 'shard_range', 'rng_state', 'set_rng_state', 'seed_everything', 'save_atomic']


def create_model_at_size(name: str, img_size: int, **kwargs: Any) -> nn.Module:
    """timm.create_model at img_size for models that take one (ViTs); CNNs, which take any size, get no img_size."""
    try:
        return timm.create_model(name, img_size=img_size, **kwargs)
    except TypeError as e:
        if 'img_size' not in str(e):
            raise
        return timm.create_model(name, **kwargs)


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
