"""Bounded pixel features (thumbnail, then PCA), a 224² RGB image folder clustered end to end, and a timm CNN."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from timm_supertoken.cli import main
from timm_supertoken.clustering import features, pixel_features
from timm_supertoken.clustering.features import PIXEL_MAX_DIMS, fit_pixel_pca
from timm_supertoken.data import load_digits_set

CPU = torch.device('cpu')


def low_rank_images(n: int, side: int, rank: int, seed: int = 0) -> torch.Tensor:
    """uint8 RGB images that are mixtures of `rank` fixed patterns: their pixels span a rank-dimensional space."""
    gen = torch.Generator().manual_seed(seed)
    patterns = torch.rand(rank, 3 * side * side, generator=gen)
    mix = torch.rand(n, rank, generator=gen) / rank
    return (mix @ patterns * 255).round().to(torch.uint8).reshape(n, 3, side, side)


def test_small_images_are_their_pixel_rows():
    digits = load_digits_set()  # 8×8, 64 numbers: under both bounds
    assert torch.equal(pixel_features(digits.images, CPU), digits.images.reshape(len(digits), -1).float() / 255)


def test_large_images_get_a_thumbnail_then_a_pca_of_bounded_width():
    images = torch.randint(0, 256, (40, 3, 224, 224), dtype=torch.uint8)
    x = pixel_features(images, CPU)
    assert x.shape == (40, 40) and x.dtype == torch.float32  # the PCA's rank is at most the number of images
    assert pixel_features(images, CPU, max_dims=16).shape == (40, 16)
    thumbnail = pixel_features(images, CPU, max_dims=None)
    assert thumbnail.shape == (40, 3 * 32 * 32)
    # area averaging: each thumbnail pixel is the mean of its 7×7 block
    blocks = images.float().div(255).reshape(40, 3, 32, 7, 32, 7).mean((3, 5)).reshape(40, -1)
    assert torch.allclose(thumbnail, blocks, atol=1e-6)


def test_the_pca_keeps_the_distances_of_images_it_spans_and_is_seeded():
    images = low_rank_images(300, 32, rank=6)
    x = pixel_features(images, CPU, max_dims=12, fit_images=100, seed=1)  # fitted on a third, applied to all
    assert x.shape == (300, 12)
    rows = pixel_features(images, CPU, max_dims=None)
    # all but the uint8 rounding, which lies off the span: distances of up to ~18 agree to a few hundredths
    assert torch.allclose(torch.cdist(x, x), torch.cdist(rows, rows), atol=0.05)
    assert torch.equal(x, pixel_features(images, CPU, max_dims=12, fit_images=100, seed=1))
    mean, components = fit_pixel_pca(images, CPU, max_dims=12)
    assert torch.allclose(components.T @ components, torch.eye(12), atol=1e-5)
    variance = ((rows - mean) @ components).var(0)
    assert (variance[:-1] >= variance[1:] - 1e-6).all()  # leading component first


def test_pca_components_match_an_exact_eigendecomposition():
    # a spectrum that decays as images' do, without a gap after the kept components
    gen = torch.Generator().manual_seed(2)
    patterns = torch.randn(200, 3 * 16 * 16, generator=gen) * 0.97 ** torch.arange(200)[:, None]
    mix = torch.randn(500, 200, generator=gen)
    images = (128 + 6 * mix @ patterns).clamp(0, 255).round().to(torch.uint8).reshape(500, 3, 16, 16)
    rows = pixel_features(images, CPU, max_dims=None)
    centred = rows - rows.mean(0)
    eigenvalues = torch.linalg.eigvalsh((centred.T @ centred).double())
    _, components = fit_pixel_pca(images, CPU, max_dims=32)
    captured = ((centred @ components).double() ** 2).sum()
    assert captured / eigenvalues[-32:].sum() > 0.999


def test_chunks_give_the_same_features(monkeypatch):
    images = low_rank_images(50, 36, rank=8)
    whole = pixel_features(images, CPU, max_dims=6)
    monkeypatch.setattr(features, 'CHUNK_FLOATS', 3 * images[0].numel())  # three images at a time
    assert torch.allclose(pixel_features(images, CPU, max_dims=6), whole, atol=1e-4)  # sums in another order


@pytest.mark.parametrize('images, options, message', [
    (torch.zeros(4, 1, 8, 8), {}, 'expected uint8 images'),
    (torch.zeros(4, 8, 8, dtype=torch.uint8), {}, r'shape \(n, C, H, W\)'),
    (torch.zeros(0, 1, 8, 8, dtype=torch.uint8), {}, 'empty set of images'),
    (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), {'max_side': 0}, 'max_side must be at least 1'),
    (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), {'max_dims': 0}, 'max_dims and fit_images must be at least 1'),
    (torch.zeros(4, 1, 8, 8, dtype=torch.uint8), {'max_dims': 4, 'fit_images': 0}, 'must be at least 1'),
])
def test_bad_input_is_named(images, options, message):
    with pytest.raises(ValueError, match=message):
        pixel_features(images, CPU, **options)


def write_shapes_folder(root, per_class: int = 16, side: int = 224) -> None:
    """An ImageFolder of side² RGB PNGs: red discs, green squares and blue triangles, each of its own size and place."""
    rng = np.random.default_rng(0)
    for name, colour in (('disc', (220, 40, 40)), ('square', (40, 200, 60)), ('triangle', (50, 70, 230))):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            im = Image.new('RGB', (side, side), tuple(int(v) for v in rng.integers(0, 60, 3)))
            r = rng.uniform(0.3, 0.4) * side
            cx, cy = side / 2 + rng.uniform(-0.1, 0.1, 2) * side
            box = (cx - r, cy - r, cx + r, cy + r)
            draw = ImageDraw.Draw(im)
            if name == 'disc':
                draw.ellipse(box, fill=colour)
            elif name == 'square':
                draw.rectangle(box, fill=colour)
            else:
                draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
            im.save(root / name / f'{i}.png')


def test_a_224_rgb_folder_clusters_end_to_end_with_a_bounded_pixel_block(tmp_path, monkeypatch):
    from timm_supertoken.clustering import deep_clustering

    write_shapes_folder(tmp_path / 'shapes')
    widths = []
    readout = deep_clustering.umap_readout
    monkeypatch.setattr(deep_clustering, 'umap_readout',
                        lambda pixels, *a, **kw: widths.append(pixels.shape[1]) or readout(pixels, *a, **kw))
    out = tmp_path / 'out'
    assert main(['cluster', '--dataset', 'folder', '--data-dir', str(tmp_path / 'shapes'), '--img-size', '224',
                 '--model', 'test_vit', '--epochs', '1', '--max-rounds', '1', '--batch-size', '16',
                 '--pretrain-epochs', '1', '--pretrain-batch-size', '16', '--kmeans-restarts', '1',
                 '--threads', '2', '--out', str(out)]) == 0
    assert widths and max(widths) <= PIXEL_MAX_DIMS  # not 3·224² = 150,528 numbers per image
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['n'] == 48 and metrics['k'] == 3 and [r['round'] for r in metrics['rounds']] == [0, 1]
    # the colours alone tell the classes apart: the pixel features must keep that
    assert metrics['baselines']['kmeans_pixels']['nmi'] > 0.9
    for record in metrics['rounds'] + list(metrics['baselines'].values()):
        assert 0.0 <= record['nmi'] <= 1.0 and 0.0 <= record['acc'] <= 1.0


def test_a_timm_cnn_clusters_digits_end_to_end(tmp_path):
    out = tmp_path / 'out'
    assert main(['cluster', '--model', 'resnet18', '--subset', '200', '--epochs', '1', '--max-rounds', '1',
                 '--kmeans-restarts', '1', '--threads', '2', '--out', str(out)]) == 0
    metrics = json.loads((out / 'metrics.json').read_text())
    assert metrics['config']['model'] == 'resnet18' and metrics['config']['model_kwargs'] == {}
    assert metrics['config']['img_size'] == 32 and [r['round'] for r in metrics['rounds']] == [0, 1]
    assert {'kmeans_pixels', 'kmeans_untrained_embedding', 'umap_pixels'} <= set(metrics['baselines'])
    centroids = torch.load(out / 'checkpoint.pt', weights_only=False)['state']['centroids']
    assert centroids.shape == (10, 512)  # resnet18's pre-logits width: the CNN's embedding was clustered
    for record in metrics['rounds']:
        assert 0.0 <= record['nmi'] <= 1.0 and record['loss'] > 0
