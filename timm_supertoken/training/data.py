"""Training loaders whose randomness does not depend on how the run is split.

Every sample is augmented under an RNG seeded by (run seed, epoch, sample index), and every global
batch is one slice of a per-epoch permutation that ranks cut into equal parts. A run resumed after a
kill, a run with more data-loader workers and a two-process run therefore see exactly the images of
an uninterrupted one-process run.
"""
import random
from typing import Any, Callable, Iterator, List, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

from ..data import ImageSet

__all__ = ['AugmentedImageSet', 'GlobalBatchSampler']

def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed per (run, epoch, sample); SeedSequence mixes the three so nearby inputs give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(2, np.uint64)[0] >> 1)


class AugmentedImageSet(Dataset):
    """An ImageSet as RGB PIL images through a timm transform, each sample under its own seeded RNG."""

    def __init__(self, data: ImageSet, transform: Callable[[Image.Image], Any], seed: int = 0):
        if data.labels is None:
            raise ValueError(f'{data.name} has no labels: training needs a labelled set')
        self.data = data
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Draw this epoch's augmentations (the same ones again when a run is resumed at this epoch)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        # timm's transforms draw from Python's, NumPy's and torch's global RNGs: seed all three for this
        # sample, then put them back so the training step's own randomness (mixup, drop path) is untouched
        states = random.getstate(), np.random.get_state(), torch.get_rng_state()
        seed = _sample_seed(self.seed, self.epoch, index)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            # RGB, as train.py's ImageFolder loader produces
            x = self.transform(self.data.pil(index).convert('RGB'))
        finally:
            random.setstate(states[0])
            np.random.set_state(states[1])
            torch.set_rng_state(states[2])
        return x, int(self.data.labels[index])


class GlobalBatchSampler(Sampler[List[int]]):
    """Batches of one rank: each global batch of a seeded per-epoch permutation, cut into `world` equal slices.

    The last incomplete global batch is dropped in training (like train.py) so every step has the same
    size on every rank; with drop_last=False (evaluation) ranks take interleaved shards of the whole set.
    """

    def __init__(self, n: int, global_batch: int, rank: int = 0, world: int = 1, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True):
        if global_batch % world:
            raise ValueError(f'batch size {global_batch} must be a multiple of the {world} processes')
        if drop_last and n < global_batch:
            raise ValueError(f'batch size {global_batch} is larger than the {n} training images')
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use this epoch's permutation."""
        self.epoch = epoch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(self.n)
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch))

    def __iter__(self) -> Iterator[List[int]]:
        order = self._order()
        if not self.drop_last:
            mine = order[self.rank::self.world]
            local = self.global_batch // self.world
            yield from (mine[i:i + local].tolist() for i in range(0, len(mine), local))
            return
        local = self.global_batch // self.world
        for start in range(0, self.n - self.global_batch + 1, self.global_batch):
            yield order[start + self.rank * local:start + (self.rank + 1) * local].tolist()

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch
        local = self.global_batch // self.world
        return -(-len(range(self.rank, self.n, self.world)) // local)
