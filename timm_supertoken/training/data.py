"""Training loaders whose randomness does not depend on how the run is split, built like timm's prefetching loader.

The CPU work per sample is timm's transform up to a uint8 tensor (crop, flip, RandAugment), run in
data-loader workers and collated by timm's `fast_collate`. Normalisation and random erasing run on
the training device in timm's `PrefetchLoader`, as in timm's train.py; Mixup/CutMix follow in the
training step.

Every sample is augmented under RNGs seeded by (run seed, epoch, sample index), and so is its random
erasing on the device. Every global batch is one slice of a per-epoch permutation that ranks cut into
equal parts. A run resumed after a kill, a run with more data-loader workers and a two-process run
therefore see exactly the images of an uninterrupted one-process run.
"""
import multiprocessing.util
import os
from dataclasses import dataclass
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from timm.data.random_erasing import RandomErasing
from timm.data.loader import PrefetchLoader, fast_collate

from ..data.image_sets import ImageSet
from ..harness import SeedPurpose, derive_seed, preserved_global_rngs, seed_global_rngs

__all__ = ['SampleTransform', 'AugmentedImageSet', 'GlobalBatchSampler', 'SampleSeededErasing', 'create_device_loader',
           'default_workers']

SampleKey = Tuple[int, int]  # (epoch, index): what the batch sampler hands the dataset for one sample


@dataclass
class SampleTransform:
    """timm's transform cut where an image may still have one channel.

    `spatial` (crop, resize, flip: the same operation on every channel) runs on the stored image, grey
    or RGB; `augment` (RandAugment or colour jitter) and `to_tensor` run on its RGB version. For a grey
    image this is the output of the whole transform on its RGB version, bit for bit, with a third of the
    resizing work: Fashion-MNIST's 28×28 images are upsampled to 224×224 one channel at a time.
    `grey_augment` is `augment` built for one-channel images, given where it matches `augment` on the
    RGB version of a grey image bit for bit: when RandAugment's fill colour, the normalisation mean, is
    itself grey. Each op then treats the three equal channels alike, so it runs on one channel, a third
    of the pixels, and the uint8 tensor of that channel is expanded to three: a view, which collation
    copies into the batch once, instead of turning the image RGB and converting three channels.
    """
    spatial: Callable[[Image.Image], Image.Image]
    augment: Callable[[Image.Image], Image.Image]
    to_tensor: Callable[[Image.Image], torch.Tensor]
    grey_augment: Optional[Callable[[Image.Image], Image.Image]] = None

    def __call__(self, img: Image.Image) -> torch.Tensor:
        img = self.spatial(img)
        if img.mode == 'L' and self.grey_augment is not None:
            return self.to_tensor(self.grey_augment(img)).expand(3, -1, -1)
        return self.to_tensor(self.augment(img if img.mode == 'RGB' else img.convert('RGB')))


class AugmentedImageSet(Dataset):
    """An ImageSet through a `SampleTransform` to (uint8 image, label, erasing seed), each sample under its own RNGs.

    Items are keyed by (epoch, index), as `GlobalBatchSampler` yields them: the epoch travels with
    the index because persistent workers keep the copy of the dataset they started with.
    """

    def __init__(self, data: ImageSet, transform: SampleTransform, seed: int = 0):
        if data.labels is None:
            raise ValueError(f'{data.name} has no labels: training needs a labelled set')
        self.data = data
        self.transform = transform
        self.seed = seed

    def __len__(self) -> int:
        return len(self.data)

    def __getitems__(self, keys: Sequence[SampleKey]) -> List[Tuple[torch.Tensor, int, int]]:
        """A batch of samples (DataLoader calls this instead of indexing one at a time)."""
        # timm's transforms draw from Python's, NumPy's and torch's global RNGs: seed all three per sample,
        # then put them back so the training step's own randomness (drop path) is untouched. Saving and
        # restoring once per batch, not per sample: NumPy's get/set_state alone costs ~170 µs.
        samples = []
        with preserved_global_rngs():
            for epoch, index in keys:
                seed_global_rngs(derive_seed(self.seed, SeedPurpose.AUGMENT, epoch, index))
                samples.append((self.transform(self.data.pil(index)), int(self.data.labels[index]),
                                derive_seed(self.seed, SeedPurpose.ERASE, epoch, index)))
        return samples

    def __getitem__(self, key: SampleKey) -> Tuple[torch.Tensor, int, int]:
        return self.__getitems__([key])[0]


class GlobalBatchSampler(Sampler[List[SampleKey]]):
    """Batches of one rank: each global batch of a seeded per-epoch permutation, cut into `world` equal slices.

    Yields lists of (epoch, index) keys for `AugmentedImageSet`. The last incomplete global batch is
    dropped in training (like train.py) so every step has the same size on every rank; with
    drop_last=False (evaluation) ranks take interleaved shards of the whole set.
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
        """Use this epoch's permutation and augmentations (the same ones again when a run is resumed at this epoch)."""
        self.epoch = epoch

    def _order(self) -> List[int]:
        if not self.shuffle:
            return list(range(self.n))
        gen = torch.Generator().manual_seed(derive_seed(self.seed, SeedPurpose.ORDER, self.epoch))
        return torch.randperm(self.n, generator=gen).tolist()

    def __iter__(self) -> Iterator[List[SampleKey]]:
        keys = [(self.epoch, i) for i in self._order()]
        local = self.global_batch // self.world
        if not self.drop_last:
            mine = keys[self.rank::self.world]
            yield from (mine[i:i + local] for i in range(0, len(mine), local))
            return
        for start in range(0, self.n - self.global_batch + 1, self.global_batch):
            yield keys[start + self.rank * local:start + (self.rank + 1) * local]

    def __len__(self) -> int:
        if self.drop_last:
            return self.n // self.global_batch
        local = self.global_batch // self.world
        return -(-len(range(self.rank, self.n, self.world)) // local)


class SampleSeededErasing:
    """timm's RandomErasing applied to each image of a batch under that image's own seed, on the batch's device.

    RandomErasing draws its rectangles from Python's `random` and its noise from the device's torch
    generator. Seeding both per image from (seed, epoch, index) makes an image's erasing independent
    of the batch it lands in, so the ranks of a DDP run erase exactly what one process erases.
    `seeds` holds the current batch's seeds; `create_device_loader` sets it before each call.
    """

    def __init__(self, erasing: RandomErasing, device: torch.device):
        self.erasing, self.device = erasing, device
        self.seeds: List[int] = []

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if len(self.seeds) != len(batch):
            raise RuntimeError(f'{len(self.seeds)} erasing seeds for a batch of {len(batch)} images')
        with preserved_global_rngs(self.device):
            for image, seed in zip(batch, self.seeds):
                seed_global_rngs(seed, self.device)
                self.erasing(image)  # in place, on the view of this image
        return batch


def _collate_with_seeds(batch: List[Tuple[torch.Tensor, int, int]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm's fast_collate of the uint8 images and labels, plus the erasing seeds (they stay on the CPU)."""
    images, labels = fast_collate(batch)
    return images, labels, torch.tensor([sample[2] for sample in batch], dtype=torch.int64)


class _SeedingBatches:
    """Yields the loader's (images, labels), first handing the batch's seeds to the erasing.

    PrefetchLoader applies its random_erasing to a batch right after taking it from here, so the
    seeds set now are the ones of the batch being erased.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.erasing: Optional[SampleSeededErasing] = None

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, seeds in self.loader:
            if self.erasing is not None:
                self.erasing.seeds = seeds.tolist()
            yield images, labels

    def __len__(self) -> int:
        return len(self.loader)


def default_workers(device: torch.device) -> int:
    """Data-loader processes per rank when none are asked for: on a GPU, every core this rank may use but the one
    that drives the GPU; on a CPU none, since the model's threads already use every core."""
    if device.type == 'cpu':
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    ranks_here = int(os.environ.get('LOCAL_WORLD_SIZE', '1'))
    return max(1, cores // ranks_here - 1)


def _reserve_worker_temp_dir() -> None:
    """Create, in this process, the folder through which data-loader workers will hand over their batches.

    A worker passes each batch's shared memory as a file descriptor through a socket in multiprocessing's
    temporary folder. Made in the worker, a failure (a full disk, a bad TMPDIR) is lost in the worker's queue
    thread and the main process waits for that batch forever; made here before the workers start, they inherit
    the folder and the failure is a clear error.
    """
    try:
        multiprocessing.util.get_temp_dir()
    except OSError as err:
        raise RuntimeError(
            f'data-loader workers need a temporary folder to pass batches through, and none could be created '
            f'({err}). Free disk space, point TMPDIR at a writable folder, or run with 0 workers.') from err


def create_device_loader(data: AugmentedImageSet, batch_sampler: GlobalBatchSampler, device: torch.device,
                         mean: Tuple[float, ...], std: Tuple[float, ...], workers: int, re_prob: float = 0.,
                         re_mode: str = 'pixel', re_count: int = 1) -> PrefetchLoader:
    """uint8 batches from `workers` processes (pinned for a GPU), normalised and randomly erased on `device`.

    timm's PrefetchLoader does the transfer (on a side stream on CUDA), the normalisation and, through
    `SampleSeededErasing`, timm's RandomErasing; batches come out as float32 on `device`.
    """
    if workers < 0:
        raise ValueError(f'workers must be >= 0, got {workers}')
    if workers:
        _reserve_worker_temp_dir()
    loader = DataLoader(data, batch_sampler=batch_sampler, num_workers=workers, collate_fn=_collate_with_seeds,
                        pin_memory=device.type == 'cuda', persistent_workers=workers > 0,
                        # the loader draws its workers' base seed from this, not from the global RNG that
                        # mixup and drop path use: a resumed run must see the same global draws
                        generator=torch.Generator())
    batches = _SeedingBatches(loader)
    prefetcher = PrefetchLoader(batches, mean=mean, std=std, device=device, re_prob=re_prob, re_mode=re_mode,
                                re_count=re_count)
    if prefetcher.random_erasing is not None:
        batches.erasing = prefetcher.random_erasing = SampleSeededErasing(prefetcher.random_erasing, device)
    return prefetcher
