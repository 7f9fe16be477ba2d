"""ImageNet-100 as a folder of symlinks over ImageNet-1k, for timm's train.py (`--data-dir DST --num-classes 100`).

The paper trains on ImageNet-100, "100 classes randomly sampled from ImageNet-1k" (~130k train / 5,000 val images),
but does not list its classes. We choose the standard list of CMC (Tian et al. 2019, "Contrastive Multiview Coding",
github.com/HobbitLong/CMC issue 21), which most published ImageNet-100 results use, so our numbers compare with
theirs; it is a choice, not the paper's own (unknown) sample. `build_imagenet100` links one folder per class into
`DST/train` and `DST/val`, which timm and torchvision then read as an ordinary ImageFolder.
"""
import os
import re
from collections.abc import Sequence
from pathlib import Path

__all__ = ['CMC_IMAGENET100', 'build_imagenet100', 'read_classes']

# one split string, not 100 quoted items, so it compares at a glance with CMC's published list
CMC_IMAGENET100: tuple[str, ...] = tuple((  # noqa: SIM905
    'n02869837 n01749939 n02488291 n02107142 n13037406 n02091831 n04517823 n04589890 n03062245 n01773797 '
    'n01735189 n07831146 n07753275 n03085013 n04485082 n02105505 n01983481 n02788148 n03530642 n04435653 '
    'n02086910 n02859443 n13040303 n03594734 n02085620 n02099849 n01558993 n04493381 n02109047 n04111531 '
    'n02877765 n04429376 n02009229 n01978455 n02106550 n01820546 n01692333 n07714571 n02974003 n02114855 '
    'n03785016 n03764736 n03775546 n02087046 n07836838 n04099969 n04592741 n03891251 n02701002 n03379051 '
    'n02259212 n07715103 n03947888 n04026417 n02326432 n03637318 n01980166 n02113799 n02086240 n03903868 '
    'n02483362 n04127249 n02089973 n03017168 n02093428 n02804414 n02396427 n04418357 n02172182 n01729322 '
    'n02113978 n03787032 n02089867 n02119022 n03777754 n04238763 n02231487 n03032252 n02138441 n02104029 '
    'n03837869 n03494278 n04136333 n03794056 n03492542 n02018207 n04067472 n03930630 n03584829 n02123045 '
    'n04229816 n02100583 n03642806 n04336792 n03259280 n02116738 n02108089 n03424325 n01855672 n02090622'
).split())

_WNID = re.compile(r'n\d{8}')
_SHOW_MISSING = 10
PathLike = str | os.PathLike[str]


def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    """Reject class lists that would silently build the wrong subset: empty, malformed or repeated wnids."""
    classes = tuple(classes)
    if not classes:
        raise ValueError('classes is empty')
    malformed = [c for c in classes if not _WNID.fullmatch(c)]
    if malformed:
        raise ValueError(f'not WordNet ids (n + 8 digits): {malformed[:_SHOW_MISSING]}')
    duplicates = sorted({c for c in classes if classes.count(c) > 1})
    if duplicates:
        raise ValueError(f'duplicate wnids in classes: {duplicates[:_SHOW_MISSING]}')
    return classes


def _count_files(folder: Path) -> int:
    """Count the files directly in one class folder: the image count reported per split."""
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.is_file())


def _check_split(split_dir: Path, split: str, classes: tuple[str, ...]) -> None:
    """Explain the common ways an ImageNet-1k split is not the ImageFolder layout we need."""
    if not split_dir.is_dir():
        raise FileNotFoundError(
            f'{split_dir} not found: expected an ImageNet-1k ImageFolder tree with train/ and val/ '
            f'holding one folder per wnid (train/n01440764/*.JPEG)')
    with os.scandir(split_dir) as entries:
        kinds = [e.is_dir() for e in entries]
    # the official val tarball unpacks to 50,000 loose files; name that instead of "100 classes missing"
    if kinds and not any(kinds):
        raise ValueError(
            f'{split_dir} holds {len(kinds)} files and no class folders: {split} must be sorted into class folders '
            f'(one per wnid, as ImageFolder expects), e.g. with the usual valprep.sh script')
    missing = [c for c in classes if not (split_dir / c).is_dir()]
    if missing:
        more = ', ...' if len(missing) > _SHOW_MISSING else ''
        raise FileNotFoundError(
            f'{len(missing)} of {len(classes)} classes missing in {split_dir}: '
            f'{", ".join(missing[:_SHOW_MISSING])}{more}. Hint: src must be the full ImageNet-1k '
            f'(1000 wnid folders per split); for another subset pass classes (--classes FILE)')


def build_imagenet100(src: PathLike, dst: PathLike, splits: Sequence[str] = ('train', 'val'),
                      classes: Sequence[str] = CMC_IMAGENET100) -> dict[str, dict[str, int]]:
    """Link the chosen class folders of ImageNet-1k into dst/<split>/ so timm reads the subset as an ImageFolder."""
    classes = _check_classes(classes)
    src_path, dst_path = Path(src), Path(dst)
    if not src_path.is_dir():
        raise FileNotFoundError(f'ImageNet-1k root {src_path} not found')
    src_root, dst_root = src_path.resolve(), dst_path.resolve()
    splits = tuple(dict.fromkeys(splits))
    if dst_root == src_root or any(dst_root.is_relative_to((src_root / s).resolve()) for s in splits):
        raise ValueError(f'dst {dst_path} must not be src {src_path} or lie inside one of its splits')

    # validate everything first, so a failure leaves dst exactly as it was
    links: list[tuple[Path, Path]] = []
    stats: dict[str, dict[str, int]] = {}
    for split in splits:
        _check_split(src_root / split, split, classes)
        for d in (dst_path, dst_path / split):
            if d.exists() and not d.is_dir():
                raise FileExistsError(f'{d} exists and is not a directory')
        images = 0
        for wnid in classes:
            target, link = src_root / split / wnid, dst_path / split / wnid
            n = _count_files(target)
            if n == 0:
                raise ValueError(f'class folder {target} is empty')
            images += n
            if link.is_symlink() and link.resolve() == target.resolve():
                continue  # left by an earlier run
            if link.is_symlink() or link.exists():
                raise FileExistsError(f'{link} exists and is not a symlink to {target}; remove it or pick another dst')
            links.append((link, target))
        stats[split] = {'classes': len(classes), 'images': images}

    for split in splits:
        (dst_path / split).mkdir(parents=True, exist_ok=True)
    for link, target in links:
        link.symlink_to(target, target_is_directory=True)
    return stats


def read_classes(path: PathLike) -> tuple[str, ...]:
    """Read a subset's wnids from a text file: the first word of each non-blank line (so synset lists work too)."""
    return tuple(line.split()[0] for line in Path(path).read_text().splitlines() if line.strip())
