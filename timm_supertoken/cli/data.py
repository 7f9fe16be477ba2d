"""`timm-supertoken dataset` and `timm-supertoken imagenet100`: data as the ImageFolder trees train.py reads."""
import argparse
from pathlib import Path

from ..data.image_folder import export_image_folder, load_labelled_splits, per_class_subset
from ..data.imagenet100 import CMC_IMAGENET100, build_imagenet100, read_classes
from .options import add_command, add_data_dir, add_seed

__all__ = ['add_commands', 'cmd_dataset', 'cmd_imagenet100']


def cmd_dataset(args: argparse.Namespace) -> int:
    """Write Fashion-MNIST or digits as an ImageFolder tree (train/, val/) for timm train.py.

    Fashion-MNIST: train = its 60k training images, val = its 10k test images. digits: the stratified 80/20
    split that `compare` uses.
    """
    train, val, classes = load_labelled_splits(args.name, args.data_dir, args.seed)
    splits = {'train': per_class_subset(train, args.train_per_class, args.seed),
              'val': per_class_subset(val, args.val_per_class, args.seed)}
    counts = export_image_folder(splits, Path(args.out), classes)
    for split, n in counts.items():
        print(f'{split}: {n:,} images in {len(classes)} class folders -> {Path(args.out) / split}')
    print(f'timm train.py: --data-dir {args.out} --num-classes {len(classes)} (train/ and val/ are found by name)')
    return 0


def cmd_imagenet100(args: argparse.Namespace) -> int:
    """Build ImageNet-100 (CMC class list) as symlinks over ImageNet-1k.

    Links the 100 CMC ImageNet-100 class folders (Tian et al. 2019) of an ImageNet-1k ImageFolder tree into
    DST/train and DST/val, for timm train.py --data-dir DST --num-classes 100.
    """
    classes = read_classes(args.classes) if args.classes else CMC_IMAGENET100
    stats = build_imagenet100(args.src, args.dst, args.splits, classes)
    for split, s in stats.items():
        print(f"{split}: {s['classes']} classes, {s['images']:,} images -> {Path(args.dst) / split}")
    print(f'timm: python train.py --data-dir {args.dst} --num-classes {len(classes)}')
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `dataset` and `imagenet100`."""
    p = add_command(subparsers, cmd_dataset)
    p.add_argument('name', choices=('fashion-mnist', 'digits'))
    p.add_argument('out', help='output folder (train/ and val/ are created in it)')
    add_data_dir(p)
    p.add_argument('--train-per-class', type=int, default=None, help='keep at most N training images per class')
    p.add_argument('--val-per-class', type=int, default=None, help='keep at most N validation images per class')
    add_seed(p, 0, help='seed of the subset and of the digits split')

    p = add_command(subparsers, cmd_imagenet100)
    p.add_argument('src', help='ImageNet-1k root with train/ and val/, each holding one folder per wnid')
    p.add_argument('dst', help='output root; DST/<split>/<wnid> become symlinks to the source class folders')
    p.add_argument('--splits', nargs='+', default=['train', 'val'], help='splits to link (default: train val)')
    p.add_argument('--classes', metavar='FILE', default=None,
                   help='text file with one wnid per line, to build another subset (default: the CMC list)')
