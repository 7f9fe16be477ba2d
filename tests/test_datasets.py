"""Real Fashion-MNIST (Debian package dataset-fashion-mnist), digits splits, and the ImageFolder export train.py reads."""
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import ImageFolder

from timm_supertoken.cli import main
from timm_supertoken.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageSet,
    export_image_folder,
    load_digits_splits,
    load_fashion_mnist,
    load_splits,
    per_class_subset,
)
from timm_supertoken.data.image_folder import class_folder_names


def test_real_fashion_mnist_is_installed_and_parsed():
    # CI installs the Debian package (README's test command); the loader reads its four idx.gz files
    assert Path(FASHION_MNIST_DIR, 'train-images-idx3-ubyte.gz').is_file(), \
        'apt-get install dataset-fashion-mnist (the README test command does)'
    train, test = load_fashion_mnist(split='train'), load_fashion_mnist(split='test')
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8
    assert np.bincount(train.labels).tolist() == [6000] * 10 and np.bincount(test.labels).tolist() == [1000] * 10
    # real photographs of clothes, not blank or random bytes: mean intensity and background as published
    assert 70 < train.images.float().mean() < 75  # Fashion-MNIST's mean pixel is 72.94
    assert (train.images[:, :, 0, :] == 0).float().mean() > 0.5  # mostly black top rows


def test_digits_split_is_stratified_and_seeded():
    train, val = load_digits_splits(seed=0)
    assert (len(train), len(val)) == (1438, 359)
    assert np.all(np.abs(np.bincount(val.labels) / np.bincount(train.labels) - 0.25) < 0.02)
    again, _ = load_digits_splits(seed=0)
    other, _ = load_digits_splits(seed=1)
    assert torch.equal(again.images, train.images) and not torch.equal(other.images, train.images)


def test_class_folders_sort_in_label_order():
    names = class_folder_names(FASHION_MNIST_CLASSES)
    assert names[0] == '0-t-shirt-top' and names[9] == '9-ankle-boot'
    assert list(names) == sorted(names)
    many = class_folder_names([f'c{i}' for i in range(12)])
    assert many[2] == '02-c2' and list(many) == sorted(many)


def test_export_round_trips_through_torchvision_imagefolder(tmp_path):
    train, val = load_digits_splits(seed=0)
    small = {'train': per_class_subset(train, 5), 'val': per_class_subset(val, 2)}
    counts = export_image_folder(small, tmp_path, [str(d) for d in range(10)])
    assert counts == {'train': 50, 'val': 20}
    folder = ImageFolder(str(tmp_path / 'train'))  # what timm's train.py ends up reading
    assert folder.class_to_idx == {f'{d}-{d}': d for d in range(10)}
    assert sorted(folder.targets) == sorted(small['train'].labels.tolist())
    path, label = folder.samples[0]
    pixels = np.asarray(folder.loader(path).convert('L'))
    matches = [i for i in range(50) if np.array_equal(small['train'].images[i, 0].numpy(), pixels)]
    assert matches and small['train'].labels[matches[0]] == label  # lossless PNG, right class folder
    with pytest.raises(FileExistsError, match='not empty'):
        export_image_folder(small, tmp_path, [str(d) for d in range(10)])


def test_exported_folder_trains_like_the_original(tmp_path):
    train, val = load_digits_splits(seed=0)
    export_image_folder({'train': per_class_subset(train, 3), 'val': per_class_subset(val, 2)}, tmp_path,
                        [str(d) for d in range(10)])
    f_train, f_val = load_splits('folder', str(tmp_path), img_size=8)
    assert (len(f_train), len(f_val)) == (30, 20) and f_train.num_classes == 10
    assert f_train.images.shape[1:] == (3, 8, 8)  # ImageFolder images come back as RGB


def test_dataset_command_exports_real_fashion_mnist(tmp_path, capsys):
    assert main(['dataset', 'fashion-mnist', str(tmp_path), '--train-per-class', '4', '--val-per-class', '2']) == 0
    out = capsys.readouterr().out
    assert 'train: 40 images in 10 class folders' in out and '--data-dir' in out
    folder = ImageFolder(str(tmp_path / 'val'))
    assert len(folder) == 20 and folder.classes[3] == '3-dress'
    assert folder.loader(folder.samples[0][0]).size == (28, 28)


def test_dataset_errors_are_clear(tmp_path):
    with pytest.raises(SystemExit, match='Fashion-MNIST file missing: .*dataset-fashion-mnist'):
        main(['dataset', 'fashion-mnist', str(tmp_path / 'out'), '--data-dir', str(tmp_path)])
    with pytest.raises(ValueError, match='per_class must be >= 1'):
        per_class_subset(ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), np.array([0, 1]), 'x'), 0)
    with pytest.raises(ValueError, match='has no labels'):
        export_image_folder({'train': ImageSet(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), None, 'x')}, tmp_path, ['a'])
