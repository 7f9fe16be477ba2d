"""Data loaders: the idx parser on files written here, Fashion-MNIST's layout, digits, ImageFolder, batching."""
import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from timm_supertoken.data import FASHION_MNIST_FILES, load_dataset, load_digits_set, load_fashion_mnist, load_image_folder, read_idx
from timm_supertoken.clustering.batches import prepare_batch


def _write_idx(path, array, type_code=0x08, compress=True):
    """An idx file as MNIST's: zero bytes, type code, ndim, big-endian dims, big-endian data."""
    dtype = {0x08: '>u1', 0x0C: '>i4', 0x0D: '>f4'}[type_code]
    payload = bytes([0, 0, type_code, array.ndim]) + struct.pack(f'>{array.ndim}I', *array.shape)
    payload += array.astype(dtype).tobytes()
    with (gzip.open if compress else open)(path, 'wb') as f:
        f.write(payload)
    return path


@pytest.mark.parametrize('type_code, compress', [(0x08, True), (0x0C, False), (0x0D, True)])
def test_read_idx_roundtrip(tmp_path, type_code, compress):
    a = np.arange(2 * 3 * 4).reshape(2, 3, 4) * (3 if type_code != 0x08 else 1)
    path = _write_idx(tmp_path / ('a.idx.gz' if compress else 'a.idx'), a, type_code, compress)
    out = read_idx(path)
    assert out.shape == (2, 3, 4) and np.array_equal(out, a)


def test_read_idx_rejects_malformed(tmp_path):
    bad_magic = tmp_path / 'bad.gz'
    with gzip.open(bad_magic, 'wb') as f:
        f.write(b'\x12\x34\x08\x01' + b'\x00' * 8)
    with pytest.raises(ValueError, match='bad.gz: not an idx file'):
        read_idx(bad_magic)
    short = _write_idx(tmp_path / 'short.gz', np.zeros((5, 2, 2), np.uint8))
    with gzip.open(short, 'rb') as f:
        data = f.read()
    with gzip.open(short, 'wb') as f:
        f.write(data[:-3])
    with pytest.raises(ValueError, match=r'short.gz: idx header promises shape \(5, 2, 2\)'):
        read_idx(short)
    not_gzip = tmp_path / 'plain.gz'
    not_gzip.write_bytes(b'not gzip at all')
    with pytest.raises(ValueError, match='plain.gz: cannot read'):
        read_idx(not_gzip)
    with pytest.raises(FileNotFoundError, match='nothere.gz'):
        read_idx(tmp_path / 'nothere.gz')


def _fake_fashion(folder, n_train=6, n_test=4):
    """Fashion-MNIST's four files with tiny contents."""
    rng = np.random.default_rng(0)
    for split, n in (('train', n_train), ('test', n_test)):
        img_file, lbl_file = FASHION_MNIST_FILES[split]
        _write_idx(folder / img_file, rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder / lbl_file, np.arange(n) % 10)


def test_fashion_mnist_layout(tmp_path):
    _fake_fashion(tmp_path)
    full = load_fashion_mnist(tmp_path)
    assert full.images.shape == (10, 1, 28, 28) and full.images.dtype == torch.uint8
    assert full.labels.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert len(load_dataset('fashion-mnist:test', str(tmp_path))) == 4
    (tmp_path / FASHION_MNIST_FILES['test'][1]).unlink()
    with pytest.raises(FileNotFoundError, match='t10k-labels-idx1-ubyte.gz.*dataset-fashion-mnist'):
        load_fashion_mnist(tmp_path)
    assert len(load_fashion_mnist(tmp_path, 'train')) == 6


def test_fashion_mnist_label_count_mismatch(tmp_path):
    _fake_fashion(tmp_path)
    _write_idx(tmp_path / FASHION_MNIST_FILES['train'][1], np.arange(5))
    with pytest.raises(ValueError, match=r'expected \(N, H, W\) images and \(N,\) labels'):
        load_fashion_mnist(tmp_path, 'train')


def test_digits():
    d = load_digits_set()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.max() == 255
    assert d.num_classes == 10
    sub = d.subset(100, seed=1)
    assert len(sub) == 100 and sub.labels.shape == (100,)


def test_image_folder(tmp_path):
    for c, colour in (('cat', (255, 0, 0)), ('dog', (0, 0, 255))):
        (tmp_path / c).mkdir()
        for i in range(3):
            Image.new('RGB', (20 + i, 17), colour).save(tmp_path / c / f'{i}.png')
    s = load_image_folder(tmp_path, 12)
    assert s.images.shape == (6, 3, 12, 12)
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.images[0, 0].float().mean() > 250 and s.images[5, 2].float().mean() > 250
    with pytest.raises(FileNotFoundError, match='image folder not found'):
        load_image_folder(tmp_path / 'missing', 12)
    with pytest.raises(ValueError, match='needs --data-dir'):
        load_dataset('folder')


def test_prepare_batch_resizes_replicates_and_augments():
    x = torch.full((4, 1, 8, 8), 255, dtype=torch.uint8)
    out = prepare_batch(x, 32, 3, torch.device('cpu'))
    assert out.shape == (4, 3, 32, 32) and torch.allclose(out, torch.ones_like(out))
    aug = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.0, 0.0], [1.0, 0.5, 0.0], [1.15, -0.15, 0.1]])
    out = prepare_batch(x, 16, 1, torch.device('cpu'), aug)
    assert out.shape == (4, 1, 16, 16)
    assert torch.equal(out[0], prepare_batch(x[:1], 16, 1, torch.device("cpu"))[0])  # identity is exact
    assert out[1, 0, 0, 0] == -1.0 and out[1, 0, 8, 8] > 0.99  # shrunk to half: black border, white centre
    with pytest.raises(ValueError, match='3 channels; the model expects 1'):
        prepare_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), 8, 1, torch.device('cpu'))
