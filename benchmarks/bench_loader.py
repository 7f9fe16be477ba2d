"""CPU benchmark of the training data pipeline: images/s per worker process, ours against timm's create_loader.

    python benchmarks/bench_loader.py [--images 512] [--workers 1] [--repeats 15]

All loaders get the same in-memory Fashion-MNIST images (28×28 grey, the `fashion_mnist` recipe at its
224×224) and the same augmentation: the recipe's crop, flip, RandAugment and random erasing, with
normalisation and erasing on the "device" (here the CPU) in timm's PrefetchLoader:

- `compare` (ours): `training.data.create_device_loader`, what `timm-supertoken compare` trains on;
- timm `create_loader`: timm's own factory, prefetcher on, as train.py uses it;
- timm `create_loader`, no prefetcher: normalisation and random erasing in the workers, the layout
  `compare` used before (without its per-sample seeding);
- `compare` (ours) with ImageNet's mean and std instead of the recipe's grey ones: RandAugment's fill
  colour is then not grey, so it runs on the RGB version of each image, as it did before the recipe
  had a mean.

Each repeat runs one pass over every loader in turn (the first loader rotates between repeats), after
one warm-up pass each that also starts the persistent workers; the figure is the median over repeats.
The per-worker rate is images per second of wall time divided by the number of workers. The result goes
to results/data_loader.json and docs/benchmarks.md is rendered again.
"""
import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from PIL import Image
from torch.utils.data import Dataset

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_loader

from timm_supertoken.data.image_sets import ImageSet, load_fashion_mnist
from timm_supertoken.training.data import AugmentedImageSet, GlobalBatchSampler, create_device_loader
from timm_supertoken.training.recipe import Recipe, load_recipe, recipe_path

from docs_page import PAGE, RESULTS_DIR, Table, result_record, target_verdict, write_result

RECIPE = 'fashion_mnist'
OURS = 'compare (ours)'
TIMM = 'timm create_loader'
TIMM_NO_PREFETCH = 'timm create_loader, no prefetcher'
OURS_RGB = 'compare (ours), ImageNet mean: RandAugment on RGB'
TARGET_RATIO = 1.0  # the goal: our per-worker throughput at least timm's


class InMemoryImages(Dataset):
    """An ImageSet as (RGB PIL image through `transform`, label), the shape of sample timm's ImageDataset gives
    create_loader (which sets `transform`)."""

    def __init__(self, data: ImageSet):
        self.data = data
        self.transform: Optional[Callable[[Image.Image], torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return self.transform(self.data.pil(index).convert('RGB')), int(self.data.labels[index])


def build_loaders(data: ImageSet, recipe: Recipe, img_size: int, workers: int, batch_size: int,
                  mean: Tuple[float, ...], std: Tuple[float, ...]) -> Dict[str, Iterable]:
    """The loaders over the same images with the same augmentation, all yielding normalised CPU batches."""
    cpu = torch.device('cpu')

    def ours(mean: Tuple[float, ...], std: Tuple[float, ...]) -> Iterable:
        return create_device_loader(
            AugmentedImageSet(data, recipe.train_transform(img_size, mean), seed=0),
            GlobalBatchSampler(len(data), batch_size, seed=0), cpu, mean, std, workers, **recipe.erasing)

    timm_kwargs = dict(
        input_size=(3, img_size, img_size), batch_size=batch_size, is_training=True, scale=recipe.scale,
        hflip=recipe.hflip, color_jitter=recipe.color_jitter, auto_augment=recipe.aa or None,
        interpolation=recipe.train_interpolation, mean=mean, std=std, num_workers=workers, device=cpu,
        persistent_workers=True, **recipe.erasing)
    return {
        OURS: ours(mean, std),
        TIMM: create_loader(InMemoryImages(data), use_prefetcher=True, **timm_kwargs),
        TIMM_NO_PREFETCH: create_loader(InMemoryImages(data), use_prefetcher=False, **timm_kwargs),
        OURS_RGB: ours(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    }


def _pass_seconds(loader: Iterable) -> Tuple[float, int]:
    """Wall time of one pass and the number of images it delivered."""
    start, images = time.perf_counter(), 0
    for x, _ in loader:
        images += x.shape[0]
    return time.perf_counter() - start, images


def time_loaders(loaders: Dict[str, Iterable], repeats: int, workers: int) -> Dict[str, Dict[str, float]]:
    """Interleaved passes; per loader the median and best images/s per worker process."""
    names = list(loaders)
    for loader in loaders.values():  # starts the persistent workers, fills caches
        _pass_seconds(loader)
    rates: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            seconds, images = _pass_seconds(loaders[name])
            rates[name].append(images / seconds / max(workers, 1))
    base = statistics.median(rates[TIMM])
    base_best = max(rates[TIMM])
    return {name: {'median': statistics.median(v), 'best': max(v), 'ratio': statistics.median(v) / base,
                   'best_ratio': max(v) / base_best} for name, v in rates.items()}


def write_loader_result(results: Dict[str, Dict[str, float]], args: argparse.Namespace, images: int,
                        load: Tuple[float, float]) -> Path:
    """results/data_loader.json: the setting, one row per loader, and the verdict on the target."""
    ratio, best = results[OURS]['ratio'], results[OURS]['best_ratio']
    per_worker = 'per worker process' if args.workers else 'in the main process (no workers)'
    setting = [
        f'The `{RECIPE}` recipe\'s training augmentation at {args.img_size}×{args.img_size} (random-resized crop, '
        f'flip, RandAugment, random erasing, normalisation with the recipe\'s mean {args.mean[0]:g} and std '
        f'{args.std[0]:g}) on {images} Fashion-MNIST images in memory, batch {args.batch_size}, {args.workers} '
        'worker process(es); '
        f'normalisation and erasing on the CPU as the "device"; images/s {per_worker}, median of {args.repeats} '
        f'interleaved passes. 1-min load average at start / end: {load[0]:.1f} / {load[1]:.1f} on '
        f'{os.cpu_count()} cores.',
    ]
    table = Table(['loader', 'img/s per worker (median)', 'ms per image', f'ratio to {TIMM}', 'fastest pass: img/s',
                   'fastest pass: ratio'],
                  [[name, r['median'], 1e3 / r['median'], r['ratio'], r['best'], r['best_ratio']]
                   for name, r in results.items()],
                  [None, '{:.1f}', '{:.2f}', '{:.3f}×', '{:.1f}', '{:.3f}×'])
    findings = [
        f'Target: {OURS} ≥ {TARGET_RATIO}× the per-worker throughput of {TIMM}. Measured: **{ratio:.3f}× (median), '
        f'{best:.3f}× (fastest pass); {target_verdict(ratio, best, TARGET_RATIO)}.** The last row keeps RandAugment '
        'on RGB (ImageNet\'s coloured mean).',
    ]
    return write_result(result_record('data_loader', 'Data loader (CPU)', [table], setting, findings),
                        args.results_dir, args.page)


def main(argv: Optional[List[str]] = None) -> None:
    """Measure the loaders, write the result and render the page."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--images', type=int, default=512, help='training images per pass')
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--img-size', type=int, default=None, help=f'default: the {RECIPE} recipe\'s')
    parser.add_argument('--workers', type=int, default=1, help='worker processes per loader')
    parser.add_argument('--repeats', type=int, default=15)
    parser.add_argument('--threads', type=int, default=1,
                        help='torch threads of the main process, which normalises and erases the batches')
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    recipe, run = load_recipe(recipe_path(RECIPE))
    args.img_size = args.img_size or run['img_size']
    data = load_fashion_mnist(split='train').subset(args.images, seed=0)

    load_start = os.getloadavg()[0]
    args.mean, args.std = tuple(run['mean']), tuple(run['std'])
    loaders = build_loaders(data, recipe, args.img_size, args.workers, args.batch_size, args.mean, args.std)
    results = time_loaders(loaders, args.repeats, args.workers)
    load = (load_start, os.getloadavg()[0])
    images = len(data) // args.batch_size * args.batch_size  # both drop the last incomplete batch
    path = write_loader_result(results, args, images, load)
    print(f'wrote {path} and {args.page}')


if __name__ == '__main__':
    main()
