"""ImageNet-100 symlink tree: the CMC list, the links, idempotent reruns, all-or-nothing validation, the CLI."""
import os
import re
from pathlib import Path

import pytest
from torchvision.datasets import ImageFolder

from timm_supertoken.cli import main
from timm_supertoken.data.imagenet100 import CMC_IMAGENET100, build_imagenet100

DISTRACTORS = ('n01440764', 'n01443537')  # tench, goldfish: in ImageNet-1k, not in the CMC list
FILES_PER_CLASS = 2


def make_imagenet1k(root: Path, splits=('train', 'val'), classes=CMC_IMAGENET100 + DISTRACTORS) -> Path:
    """A fake ImageNet-1k ImageFolder tree: a couple of tiny files per class folder."""
    for split in splits:
        for wnid in classes:
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(FILES_PER_CLASS):
                (folder / f'{wnid}_{i}.JPEG').write_bytes(b'x')
    return root


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_imagenet1k(tmp_path / 'imagenet')


def test_cmc_list():
    assert len(CMC_IMAGENET100) == 100
    assert len(set(CMC_IMAGENET100)) == 100
    assert all(re.fullmatch(r'n\d{8}', c) for c in CMC_IMAGENET100)
    assert CMC_IMAGENET100[0] == 'n02869837' and CMC_IMAGENET100[-1] == 'n02090622'
    assert not set(DISTRACTORS) & set(CMC_IMAGENET100)


def test_build_links_class_folders(src: Path, tmp_path: Path):
    dst = tmp_path / 'in100'
    stats = build_imagenet100(src, dst)
    assert stats == {s: {'classes': 100, 'images': 100 * FILES_PER_CLASS} for s in ('train', 'val')}
    for split in ('train', 'val'):
        entries = sorted(os.listdir(dst / split))
        assert entries == sorted(CMC_IMAGENET100)
        for wnid in entries:
            link = dst / split / wnid
            assert link.is_symlink() and Path(os.readlink(link)).is_absolute()
            assert link.resolve() == (src / split / wnid).resolve()
        assert not any((dst / split / d).exists() for d in DISTRACTORS)
    # the path timm's train.py takes for --data-dir: torchvision/timm ImageFolder over dst/train
    ds = ImageFolder(str(dst / 'train'), loader=lambda p: p, is_valid_file=lambda p: True)
    assert len(ds.classes) == 100 and ds.classes == sorted(CMC_IMAGENET100)
    assert len(ds) == 100 * FILES_PER_CLASS


def test_rerun_is_idempotent(src: Path, tmp_path: Path):
    dst = tmp_path / 'in100'
    first = build_imagenet100(src, dst)
    links = {p: os.readlink(p) for p in (dst / 'train').iterdir()}
    assert build_imagenet100(src, dst) == first
    assert {p: os.readlink(p) for p in (dst / 'train').iterdir()} == links


def test_conflicting_entry(src: Path, tmp_path: Path):
    dst = tmp_path / 'in100'
    wnid = CMC_IMAGENET100[5]
    (dst / 'train').mkdir(parents=True)
    (dst / 'train' / wnid).symlink_to(src / 'train' / DISTRACTORS[0], target_is_directory=True)
    with pytest.raises(FileExistsError, match=wnid):
        build_imagenet100(src, dst)
    (dst / 'train' / wnid).unlink()
    (dst / 'train' / wnid).mkdir()
    with pytest.raises(FileExistsError, match=wnid):
        build_imagenet100(src, dst)
    assert os.listdir(dst / 'train') == [wnid]  # nothing else was linked


def test_missing_classes_creates_nothing(tmp_path: Path):
    src = make_imagenet1k(tmp_path / 'imagenet', classes=CMC_IMAGENET100[3:])
    dst = tmp_path / 'in100'
    with pytest.raises(FileNotFoundError) as err:
        build_imagenet100(src, dst)
    assert '3 of 100' in str(err.value) and CMC_IMAGENET100[0] in str(err.value)
    assert not dst.exists()


def test_missing_val_classes_creates_no_train_links(tmp_path: Path):
    src = make_imagenet1k(tmp_path / 'imagenet', splits=('train',))
    make_imagenet1k(src, splits=('val',), classes=CMC_IMAGENET100[:-1])
    dst = tmp_path / 'in100'
    with pytest.raises(FileNotFoundError, match=f'1 of 100 .*{CMC_IMAGENET100[-1]}'):
        build_imagenet100(src, dst)
    assert not dst.exists()


def test_flat_val(tmp_path: Path):
    src = make_imagenet1k(tmp_path / 'imagenet', splits=('train',))
    (src / 'val').mkdir()
    for i in range(3):
        (src / 'val' / f'ILSVRC2012_val_{i:08d}.JPEG').write_bytes(b'x')
    with pytest.raises(ValueError, match='class folders'):
        build_imagenet100(src, tmp_path / 'in100')
    assert not (tmp_path / 'in100').exists()


def test_missing_src_and_split(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match='nowhere'):
        build_imagenet100(tmp_path / 'nowhere', tmp_path / 'in100')
    src = make_imagenet1k(tmp_path / 'imagenet', splits=('train',))
    with pytest.raises(FileNotFoundError, match=r'val.*train/ and val/'):
        build_imagenet100(src, tmp_path / 'in100')


def test_empty_class_folder(src: Path, tmp_path: Path):
    wnid = CMC_IMAGENET100[42]
    for f in (src / 'val' / wnid).iterdir():
        f.unlink()
    with pytest.raises(ValueError, match=f'val/{wnid}'):
        build_imagenet100(src, tmp_path / 'in100')
    assert not (tmp_path / 'in100').exists()


def test_bad_class_lists_and_dst(src: Path):
    with pytest.raises(ValueError, match='duplicate'):
        build_imagenet100(src, src.parent / 'x', classes=('n01440764', 'n01440764'))
    with pytest.raises(ValueError, match='WordNet'):
        build_imagenet100(src, src.parent / 'x', classes=('tench',))
    with pytest.raises(ValueError, match='must not'):
        build_imagenet100(src, src)
    with pytest.raises(ValueError, match='must not'):
        build_imagenet100(src, src / 'train' / 'sub')
    assert not (src.parent / 'x').exists() and not (src / 'train' / 'sub').exists()


def test_custom_classes(src: Path, tmp_path: Path):
    stats = build_imagenet100(src, tmp_path / 'two', splits=('val',), classes=DISTRACTORS)
    assert stats == {'val': {'classes': 2, 'images': 2 * FILES_PER_CLASS}}
    assert sorted(os.listdir(tmp_path / 'two' / 'val')) == sorted(DISTRACTORS)
    assert not (tmp_path / 'two' / 'train').exists()


def test_cli_default(src: Path, tmp_path: Path, capsys):
    dst = tmp_path / 'in100'
    assert main(['imagenet100', str(src), str(dst)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'train: 100 classes, 200 images -> {dst / "train"}'
    assert out[1] == f'val: 100 classes, 200 images -> {dst / "val"}'
    assert f'--data-dir {dst} --num-classes 100' in out[2]


def test_cli_classes_file(src: Path, tmp_path: Path, capsys):
    class_file = tmp_path / 'classes.txt'
    class_file.write_text(f'{DISTRACTORS[0]}\n\n{DISTRACTORS[1]} goldfish\n')
    dst = tmp_path / 'sub'
    assert main(['imagenet100', str(src), str(dst), '--splits', 'train', '--classes', str(class_file)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'train: 2 classes, 4 images -> {dst / "train"}'
    assert f'--data-dir {dst} --num-classes 2' in out[1]
    assert sorted(os.listdir(dst / 'train')) == sorted(DISTRACTORS)
    assert not (dst / 'val').exists()
