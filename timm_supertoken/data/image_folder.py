"""Write an in-memory image set as an ImageFolder tree (train/ and val/), the layout timm's train.py reads.

timm's train.py cannot read idx files; with `--data-dir OUT` it reads OUT/train and OUT/validation
or OUT/val through torchvision's ImageFolder. Class folders are named so that their sorted order is
the dataset's own label order (`0-t-shirt-top`, `1-trouser`, ...), hence train.py's class indices
equal the original labels.
"""
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from .image_sets import ImageSet, load_splits

__all__ = ['FASHION_MNIST_CLASSES', 'class_folder_names', 'per_class_subset', 'export_image_folder',
           'load_labelled_splits']

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')


def class_folder_names(names: Sequence[str]) -> Tuple[str, ...]:
    """'3-dress' style folder names whose lexicographic order is the label order (zero-padded index first)."""
    width = len(str(len(names) - 1))
    slug = (''.join(c if c.isalnum() else '-' for c in n.lower()).strip('-') for n in names)
    return tuple(f'{i:0{width}d}-{s}' for i, s in enumerate(slug))


def per_class_subset(data: ImageSet, per_class: Optional[int], seed: int = 0) -> ImageSet:
    """A seeded subset with at most per_class images of every class (None: all), in the original order."""
    if per_class is None:
        return data
    if per_class < 1:
        raise ValueError(f'per_class must be >= 1, got {per_class}')
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(data.labels):
        members = np.flatnonzero(data.labels == c)
        keep.append(rng.choice(members, min(per_class, len(members)), replace=False))
    idx = np.sort(np.concatenate(keep))
    return ImageSet(data.images[idx], data.labels[idx], f'{data.name}[{per_class}/class]')


def export_image_folder(splits: Dict[str, ImageSet], out: Path, class_names: Sequence[str]) -> Dict[str, int]:
    """Write each split as out/split/<class folder>/<index>.png (grayscale stays 'L'); returns images per split."""
    out = Path(out)
    folders = class_folder_names(class_names)
    for split, data in splits.items():
        if data.labels is None:
            raise ValueError(f'{data.name} has no labels: an ImageFolder tree needs a class per image')
        if int(data.labels.max()) >= len(folders):
            raise ValueError(f'{data.name} has label {int(data.labels.max())} but only {len(folders)} class names')
        target = out / split
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(f'{target} already exists and is not empty: choose another output folder')
    counts = {}
    for split, data in splits.items():
        for folder in folders:
            (out / split / folder).mkdir(parents=True, exist_ok=True)
        width = len(str(len(data)))
        for i, label in enumerate(data.labels):
            data.pil(i).save(out / split / folders[label] / f'{i:0{width}d}.png')
        counts[split] = len(data)
    return counts


def load_labelled_splits(name: str, data_dir: Optional[str] = None,
                         seed: int = 0) -> Tuple[ImageSet, ImageSet, Sequence[str]]:
    """(train, val, class names): the splits `compare` trains and evaluates on, with the names their folders get."""
    classes = {'fashion-mnist': FASHION_MNIST_CLASSES, 'digits': tuple(str(d) for d in range(10))}
    if name not in classes:
        raise ValueError(f"unknown dataset {name!r}: use 'fashion-mnist' or 'digits'")
    return (*load_splits(name, data_dir, seed=seed), classes[name])
