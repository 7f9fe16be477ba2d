"""The real image sets this package trains and clusters on, held in memory as uint8 at their stored size.

An `ImageSet` is a uint8 tensor (N, C, h, w) plus optional labels: Fashion-MNIST from its idx files
(Debian package `dataset-fashion-mnist`), scikit-learn's bundled digits, or any ImageFolder tree.
Consumers resize on the fly (70k Fashion-MNIST images at 224×224 would need 42 GB as float32).
"""
import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image

__all__ = [
    'DATASETS', 'load_splits', 'ImageSet', 'load_digits_set', 'load_digits_splits', 'stratified_split', 'read_idx', 'load_fashion_mnist', 'load_image_folder', 'load_dataset',
    'FASHION_MNIST_DIR', 'FASHION_MNIST_FILES',
]

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'  # Debian package `dataset-fashion-mnist`
FASHION_MNIST_FILES = {
    'train': ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'),
    'test': ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'),
}
DIGITS_VAL_FRACTION = 0.2  # digits has no official split
# idx type codes (the third magic byte) -> numpy big-endian dtype
_IDX_DTYPES = {0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'}


@dataclass
class ImageSet:
    images: torch.Tensor  # (N, C, h, w) uint8
    labels: Optional[np.ndarray]  # (N,) int64 ground truth, None if unknown
    name: str

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        """Distinct ground-truth classes (0 without labels)."""
        return 0 if self.labels is None else int(np.unique(self.labels).size)

    def subset(self, n: int, seed: int = 0) -> 'ImageSet':
        """A seeded random subset of n images, for quick runs and tests."""
        if n >= len(self):
            return self
        idx = np.sort(np.random.default_rng(seed).choice(len(self), n, replace=False))
        labels = None if self.labels is None else self.labels[idx]
        return ImageSet(self.images[torch.from_numpy(idx)], labels, f'{self.name}[{n}]')

    def pil(self, index: int) -> Image.Image:
        """Image index as PIL: 'L' for one channel, 'RGB' for three (what PNG export and timm's transforms take)."""
        arr = self.images[index].numpy()
        if arr.shape[0] == 1:
            return Image.fromarray(arr[0], 'L')
        return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), 'RGB')


def load_digits_set() -> ImageSet:
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes, gray levels 0-16 rescaled to 0-255)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    images = np.round(d.images * (255. / 16.)).astype(np.uint8)[:, None]
    return ImageSet(torch.from_numpy(images), d.target.astype(np.int64), 'digits')


def stratified_split(data: ImageSet, val_fraction: float, seed: int) -> Tuple[ImageSet, ImageSet]:
    """A seeded split that keeps every class's share in both parts (for sets without an official split)."""
    if data.labels is None:
        raise ValueError(f'{data.name} has no labels to stratify on')
    rng = np.random.default_rng(seed)
    val_idx: List[np.ndarray] = []
    for c in np.unique(data.labels):
        members = np.flatnonzero(data.labels == c)
        val_idx.append(rng.choice(members, max(1, round(len(members) * val_fraction)), replace=False))
    val = np.zeros(len(data), dtype=bool)
    val[np.concatenate(val_idx)] = True

    def take(mask: np.ndarray, part: str) -> ImageSet:
        idx = np.flatnonzero(mask)
        return ImageSet(data.images[torch.from_numpy(idx)], data.labels[idx], f'{data.name}:{part}')
    return take(~val, 'train'), take(val, 'val')


def load_digits_splits(seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """Digits has no official split: a seeded, class-stratified 80/20 (train, val) one."""
    return stratified_split(load_digits_set(), DIGITS_VAL_FRACTION, seed)


def read_idx(path: Union[str, Path]) -> np.ndarray:
    """Parse an idx file (MNIST's format, gzipped or not) into an array; errors name the file and the fault."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'idx file not found: {path}')
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f'{path}: cannot read ({e})') from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f'{path}: not an idx file (bad magic number {data[:4].hex() or "<empty>"})')
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(data) < header:
        raise ValueError(f'{path}: truncated idx header')
    shape = struct.unpack(f'>{ndim}I', data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise ValueError(f'{path}: idx header promises shape {shape} ({expected} bytes) '
                         f'but the file holds {len(data) - header} bytes of data')
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder('='))


def load_fashion_mnist(data_dir: Union[str, Path, None] = None, split: str = 'all') -> ImageSet:
    """Fashion-MNIST from its four idx .gz files; split 'train' (60k), 'test' (10k) or 'all' (70k, as DEC/N2D)."""
    data_dir = Path(data_dir or FASHION_MNIST_DIR)
    splits = ['train', 'test'] if split == 'all' else [split]
    if any(s not in FASHION_MNIST_FILES for s in splits):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    images, labels = [], []
    for s in splits:
        img_file, lbl_file = (data_dir / f for f in FASHION_MNIST_FILES[s])
        for f in (img_file, lbl_file):
            if not f.is_file():
                raise FileNotFoundError(
                    f'Fashion-MNIST file missing: {f} (install the Debian package dataset-fashion-mnist, '
                    f'or pass --data-dir to a folder holding {", ".join(FASHION_MNIST_FILES[s])})')
        x, y = read_idx(img_file), read_idx(lbl_file)
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise ValueError(f'{img_file} / {lbl_file}: expected (N, H, W) images and (N,) labels, '
                             f'got {x.shape} and {y.shape}')
        images.append(x.astype(np.uint8))
        labels.append(y.astype(np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(images))[:, None], np.concatenate(labels), f'fashion-mnist-{split}')


def load_image_folder(root: Union[str, Path], img_size: int) -> ImageSet:
    """Any torchvision ImageFolder tree (root/class/xxx.png), as RGB resized to img_size; classes become labels."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f'image folder not found: {root}')
    folder = ImageFolder(str(root))  # raises if there are no class folders with images
    images = np.empty((len(folder), img_size, img_size, 3), dtype=np.uint8)
    for i, (path, _) in enumerate(folder.samples):
        with Image.open(path) as im:
            images[i] = np.asarray(im.convert('RGB').resize((img_size, img_size), Image.BICUBIC))
    labels = np.asarray(folder.targets, dtype=np.int64)
    return ImageSet(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels, f'folder:{root.name}')


DATASETS = ('digits', 'fashion-mnist', 'folder')


def load_splits(dataset: str, data_dir: Optional[str] = None, img_size: int = 32,
                seed: int = 0) -> Tuple[ImageSet, ImageSet]:
    """(train, val) of 'digits' (stratified 80/20), 'fashion-mnist' (60k/10k) or 'folder' (DATA_DIR/train, DATA_DIR/val)."""
    if dataset == 'digits':
        return load_digits_splits(seed)
    if dataset == 'fashion-mnist':
        return load_fashion_mnist(data_dir, 'train'), load_fashion_mnist(data_dir, 'test')
    if dataset == 'folder':
        if data_dir is None:
            raise ValueError("dataset 'folder' needs --data-dir: a folder with train/ and val/ ImageFolder trees")
        root = Path(data_dir)
        for split in ('train', 'val'):
            if not (root / split).is_dir():
                raise FileNotFoundError(f'{root / split} not found: --data-dir must hold train/ and val/ '
                                        f'ImageFolder trees (timm-supertoken dataset writes one)')
        train, val = load_image_folder(root / 'train', img_size), load_image_folder(root / 'val', img_size)
        if train.num_classes != val.num_classes:
            raise ValueError(f'{root}: train/ has {train.num_classes} classes but val/ has {val.num_classes}')
        return train, val
    raise ValueError(f'unknown dataset {dataset!r}: use one of {", ".join(DATASETS)}')


def load_dataset(name: str, data_dir: Optional[str] = None, img_size: int = 32) -> ImageSet:
    """Dispatch by name: 'digits', 'fashion-mnist' (optionally ':train' / ':test') or 'folder' (needs data_dir)."""
    if name == 'digits':
        return load_digits_set()
    if name.startswith('fashion-mnist'):
        split = name.partition(':')[2] or 'all'
        return load_fashion_mnist(data_dir, split)
    if name == 'folder':
        if data_dir is None:
            raise ValueError("dataset 'folder' needs --data-dir pointing at an ImageFolder tree")
        return load_image_folder(data_dir, img_size)
    raise ValueError(f"unknown dataset {name!r}: use 'digits', 'fashion-mnist[:train|:test]' or 'folder'")
