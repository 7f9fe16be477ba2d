"""The run harness that `compare`'s trainer and the deep-clustering loop share.

- Processes: the commands call `init_distributed` once (timm's `init_distributed_device_so` joins
  torchrun's process group); library functions take the resulting `DistributedEnv` (device, rank,
  world) and never set up a process group themselves.
- Seeds: every random stream of a run is seeded by `derive_seed(seed, purpose, epoch, index)`. Draws
  from the global RNGs (weight init, Mixup, drop path) happen inside `seeded_global_rngs`, which puts
  the caller's RNG state back afterwards. A resumed run, and a run split over more processes, thus
  draw what one uninterrupted process draws: what timm's `random_seed` alone does not give.
- Checkpoints: `save_atomic` writes them, `load_for_resume` reads one back through the package's
  safe reader, and `check_same_run` refuses one written by a different run, naming what differs.
- Progress and metrics: `progress` (a bar on a terminal, one line per loop in a log), `log`,
  `write_metrics`, and `check_finite`, which stops a diverged run with its remedy.
"""
import enum
import json
import math
import os
import random
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from timm.utils.distributed import init_distributed_device_so, is_distributed_env, world_info_from_env

from .checkpoint import CheckpointError, load_checkpoint

__all__ = ['DEVICE_HELP', 'DistributedEnv', 'init_distributed', 'shard_range', 'SeedPurpose', 'derive_seed',
           'seed_global_rngs', 'preserved_global_rngs', 'seeded_global_rngs', 'save_atomic', 'load_for_resume',
           'check_same_run', 'write_metrics', 'log', 'check_finite', 'on_terminal', 'progress']


# ---- processes ---------------------------------------------------------------------------------------------------

DEVICE_HELP = "'auto' (CUDA if available), 'cpu', 'cuda', ...; under torchrun each process takes its local rank's GPU"


def _resolve_device(device: str) -> torch.device:
    """'auto' is CUDA when there is a GPU, else the CPU; an explicit CUDA request without one is a clear error."""
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    resolved = torch.device(device)
    if resolved.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError(f'device {device!r} requested but no CUDA GPU is available (use --device cpu)')
    return resolved


@dataclass(frozen=True)
class DistributedEnv:
    """This process's device and its place among the run's processes: rank `rank` of `world`."""
    device: torch.device
    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls, device: str = 'auto') -> 'DistributedEnv':
        """The process group already joined (by `init_distributed` or the caller), else one process; sets up nothing."""
        resolved = _resolve_device(device)
        if not (dist.is_available() and dist.is_initialized()):
            return cls(resolved)
        if resolved.type == 'cuda' and resolved.index is None:
            resolved = torch.device('cuda', world_info_from_env()[0])  # one GPU per local rank, as torchrun assigns
        return cls(resolved, dist.get_rank(), dist.get_world_size())

    @property
    def is_primary(self) -> bool:
        """Rank 0: the process that logs and writes the run's files."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in one process)."""
        if self.world > 1:
            dist.barrier()

    def data_parallel(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        """model under DDP when there are several processes (kwargs go to DDP), else model itself."""
        if self.world == 1:
            return model
        device_ids = [self.device] if self.device.type == 'cuda' else None
        return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def init_distributed(device: str = 'auto') -> DistributedEnv:
    """Join torchrun's process group (NCCL on CUDA, gloo on CPU) once per process: what the commands call first."""
    if is_distributed_env() and not dist.is_initialized():
        init_distributed_device_so(str(_resolve_device(device)))
    return DistributedEnv.current(device)


def shard_range(n: int, rank: int, world: int) -> Tuple[int, int]:
    """Contiguous [start, stop) of rank's share of n items: ceil(n / world) each, the last ranks take what is left."""
    per = -(-n // world)
    return min(rank * per, n), min((rank + 1) * per, n)


# ---- seeds -------------------------------------------------------------------------------------------------------

class SeedPurpose(enum.IntEnum):
    """What a derived seed is for: streams of different purposes draw unrelated numbers."""
    WEIGHTS = 1  # initial weights (and heads created later, such as the contrastive projection)
    STEPS = 2  # the global RNG draws of one rank's epoch or round: Mixup, drop path, dropout
    ORDER = 3  # batch order (and per-image augmentation parameters drawn with it) of an epoch or round
    AUGMENT = 4  # one sample's CPU transform
    ERASE = 5  # one sample's random erasing on the device
    CONTRASTIVE = 6  # the contrastive stage's batch order and views
    CONTRASTIVE_STEPS = 7  # the contrastive stage's global RNG draws on one rank
    CLUSTERING = 8  # k-means restarts and the UMAP layout of one stage


_MASK64 = (1 << 64) - 1


def _mix64(z: int) -> int:
    """SplitMix64's step: a bijection of 64-bit integers whose outputs for nearby inputs look unrelated."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def derive_seed(seed: int, purpose: SeedPurpose, epoch: int = 0, index: int = 0) -> int:
    """The 63-bit seed of one stream: (run seed, purpose, epoch or round, sample index or rank).

    SplitMix64 chained over the four numbers: cheap enough to call for every sample of every epoch,
    where NumPy's SeedSequence would cost an order of magnitude more.
    """
    z = 0
    for part in (seed, int(purpose), epoch, index):
        z = _mix64(z ^ (part & _MASK64))
    return z >> 1


def seed_global_rngs(seed: int, device: Optional[torch.device] = None) -> None:
    """Seed Python's `random`, NumPy's and torch's CPU global RNGs (and device's, on CUDA), which timm draws from.

    Library code calls it inside `preserved_global_rngs`, so that its caller's streams go on untouched.
    """
    random.seed(seed)
    np.random.seed(seed & 0xFFFFFFFF)
    torch.default_generator.manual_seed(seed)
    if device is not None and device.type == 'cuda':
        _cuda_generator(device).manual_seed(seed)


def _cuda_generator(device: torch.device) -> torch.Generator:
    return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]


@contextmanager
def preserved_global_rngs(device: Optional[torch.device] = None) -> Iterator[None]:
    """The global RNGs' states (device's too, on CUDA) put back on exit, whatever the block drew or seeded."""
    cuda = _cuda_generator(device) if device is not None and device.type == 'cuda' else None
    states = random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda and cuda.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            cuda.set_state(states[3])


@contextmanager
def seeded_global_rngs(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """The global RNGs seeded with seed inside the block, and the caller's states back after it."""
    with preserved_global_rngs(device):
        seed_global_rngs(seed, device)
        yield


# ---- checkpoints -------------------------------------------------------------------------------------------------

def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(a temporary path) then rename it to path: a kill mid-write leaves the previous file intact."""
    tmp = path.with_suffix('.tmp')
    write(tmp)
    os.replace(tmp, path)


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save, atomically: a kill mid-write leaves the previous checkpoint intact."""
    _write_atomic(path, lambda tmp: torch.save(obj, tmp))


def load_for_resume(path: Path, device: torch.device, required: Iterable[str], written_by: str) -> Dict[str, Any]:
    """A run's own checkpoint (the safe reader's rule) with the `required` keys; errors name the file and the fix."""
    try:
        ckpt = load_checkpoint(path, map_location=device)
    except CheckpointError as e:
        raise CheckpointError(f'{e}; cannot resume from it: delete it to restart, or use another output folder') from e
    missing = set(required) - set(ckpt if isinstance(ckpt, dict) else ())
    if missing:
        raise CheckpointError(f'{path}: not a checkpoint written by {written_by} (missing {sorted(missing)}); '
                              f'use another output folder or drop --resume')
    return ckpt


def check_same_run(saved: Mapping[str, Any], current: Mapping[str, Any], path: Path,
                   absent: Optional[Mapping[str, Any]] = None) -> None:
    """Refuse to continue a checkpoint written by a different run, naming each setting that differs.

    absent gives the value of a setting that checkpoints written before it existed do not hold.
    """
    absent = absent or {}
    differ = {k: (saved.get(k, absent.get(k)), v) for k, v in current.items() if saved.get(k, absent.get(k)) != v}
    if differ:
        details = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in differ.items())
        raise ValueError(f'{path} was written by a different run ({details}); '
                         'use another output folder or drop --resume')


# ---- progress and metrics ----------------------------------------------------------------------------------------

def write_metrics(record: Mapping[str, Any], path: Path) -> None:
    """A run's metrics as JSON, rewritten atomically after every epoch or round so a long run can be watched."""
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2, default=str)))


def log(message: str) -> None:
    """One line of a run's log, printed above a live progress bar instead of through it."""
    tqdm.write(message)


def check_finite(value: float, what: str, remedy: str) -> None:
    """A NaN or infinite loss stops the run with the remedy, instead of training on garbage."""
    if not math.isfinite(value):
        raise FloatingPointError(f'{what} became {value}; {remedy}')


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
