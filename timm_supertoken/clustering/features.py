"""Pixel features of bounded width for the pixel baselines and the UMAP readout, whatever the image size.

Flattening images at their stored size gives C·H·W numbers per image: 784 for Fashion-MNIST, 150,528
for a 224² RGB folder, which no readout over tens of thousands of images can hold or search. Two bounds
keep the width fixed. An area-averaged thumbnail of at most `max_side`² per channel keeps what k-means
and a cosine neighbour graph see of an image (its layout of light and dark) and drops the fine detail
that a larger image adds; images already that small are left as they are. When the thumbnail still has
more than `max_dims` numbers, a PCA onto its `max_dims` leading components, fitted on a seeded subsample
and applied chunk by chunk, keeps the directions of most variance: Euclidean distances (k-means) and
centred cosines (`manifold.joint_features`) change little, and the neighbour search gets fewer
dimensions. No whitening: it would give the low-variance, mostly noise directions the weight of the
leading ones. Memory is O(n·max_dims + fit_images·C·max_side² + one chunk of images in float): nothing
n × C·H·W in float is ever held.
"""
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['pixel_features', 'fit_pixel_pca', 'PIXEL_MAX_SIDE', 'PIXEL_MAX_DIMS', 'PCA_FIT_IMAGES']

# chosen on digits and Fashion-MNIST so that neither the pixel k-means baseline nor the pixel readout
# loses NMI (benchmarks/bench_pixel_features.py): 28² glyphs keep their size, a 224² photo becomes 32²
PIXEL_MAX_SIDE = 32
PIXEL_MAX_DIMS = 128
PCA_FIT_IMAGES = 10_000  # enough for a stable leading subspace; the fit costs O(m·d²) for d = C·side²
# floats per chunk of images converted at their stored size (64 MB): 21k Fashion-MNIST images, 111 at 224² RGB
CHUNK_FLOATS = 1 << 24
# power steps of the PCA's subspace iteration: the block's leading directions converge as (λ_2D / λ_i)^steps
SUBSPACE_ITERATIONS = 4


def _check_images(images: torch.Tensor, max_side: int) -> None:
    if images.ndim != 4:
        raise ValueError(f'expected uint8 images of shape (n, C, H, W), got shape {tuple(images.shape)}')
    if images.dtype != torch.uint8:
        raise ValueError(f'expected uint8 images (0-255), got dtype {images.dtype}')
    if images.shape[0] == 0:
        raise ValueError('cannot take pixel features of an empty set of images (n = 0)')
    if max_side < 1:
        raise ValueError(f'max_side must be at least 1, got {max_side}')


def _thumbnails(images: torch.Tensor, device: torch.device, max_side: int = PIXEL_MAX_SIDE) -> torch.Tensor:
    """uint8 (n, C, H, W) as float rows in [0, 1] on device, each side area-averaged down to at most max_side.

    Area averaging (adaptive average pooling) is the anti-aliased downscale: every pixel counts, so a thin
    stroke dims instead of vanishing as it could under point sampling.
    """
    x = images.to(device, non_blocking=True).float().div_(255.)
    size = (min(x.shape[-2], max_side), min(x.shape[-1], max_side))
    if size != tuple(x.shape[-2:]):
        x = F.adaptive_avg_pool2d(x, size)
    return x.reshape(x.shape[0], -1)


def _thumbnail_chunks(images: torch.Tensor, device: torch.device, max_side: int) -> Iterator[torch.Tensor]:
    """The thumbnails of images in dataset order, a chunk of at most CHUNK_FLOATS input floats at a time."""
    chunk = max(1, CHUNK_FLOATS // images[0].numel())
    for start in range(0, images.shape[0], chunk):
        yield _thumbnails(images[start:start + chunk], device, max_side)


@torch.no_grad()
def fit_pixel_pca(images: torch.Tensor, device: torch.device, max_side: int = PIXEL_MAX_SIDE,
                  max_dims: int = PIXEL_MAX_DIMS, fit_images: int = PCA_FIT_IMAGES,
                  seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mean (d,), components (d, D)) of the thumbnails of a seeded subsample of at most fit_images images.

    The components are the covariance's leading eigenvectors, by eigenvalue, descending, with
    D = min(max_dims, d, subsample size). They come from a seeded subspace iteration (Halko, Martinsson &
    Tropp 2011) on a block of 2·D vectors, then the exact eigenvectors within that block: O(d²·D) instead
    of a full eigendecomposition's O(d³), which dominates the fit at a 32² RGB thumbnail (d = 3072).
    """
    _check_images(images, max_side)
    if max_dims < 1 or fit_images < 1:
        raise ValueError(f'max_dims and fit_images must be at least 1, got {max_dims} and {fit_images}')
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    if n > fit_images:
        images = images[torch.randperm(n, generator=gen)[:fit_images].sort().values.to(images.device)]
    chunks = list(_thumbnail_chunks(images, device, max_side))
    m, d = images.shape[0], chunks[0].shape[1]
    mean = (sum(c.double().sum(0) for c in chunks) / m).float()
    cov = torch.zeros(d, d, device=device)
    for c in chunks:
        centred = c - mean
        cov.addmm_(centred.T, centred)
    width = min(max_dims, d, m)
    block = min(2 * width, d)
    basis = torch.randn(d, block, generator=gen).to(device)
    for _ in range(SUBSPACE_ITERATIONS):
        basis = torch.linalg.qr(cov @ basis).Q
    _, vectors = torch.linalg.eigh((basis.T @ cov @ basis).double())
    components = (basis.double() @ vectors[:, -width:].flip(1)).float()
    # an eigenvector's sign is arbitrary: fix it (largest entry positive, as scikit-learn's svd_flip) so that
    # the coordinates do not flip with the order of floating-point sums
    largest = components.abs().argmax(0)
    return mean, (components * components[largest, torch.arange(width)].sign()).contiguous()


@torch.no_grad()
def pixel_features(images: torch.Tensor, device: torch.device, max_side: int = PIXEL_MAX_SIDE,
                   max_dims: Optional[int] = PIXEL_MAX_DIMS, fit_images: int = PCA_FIT_IMAGES,
                   seed: int = 0) -> torch.Tensor:
    """The pixel block of the k-means baselines and the readout: (n, D) float32 on device, D bounded.

    Thumbnails of at most max_side² per channel; when C·side² exceeds max_dims, their PCA coordinates
    (centred, unwhitened) on max_dims components fitted on a seeded subsample of fit_images images.
    max_dims=None keeps the thumbnails whole. Deterministic per seed.
    """
    _check_images(images, max_side)
    side = min(images.shape[-2], max_side) * min(images.shape[-1], max_side)
    if max_dims is None or images.shape[1] * side <= max_dims:
        return torch.cat(list(_thumbnail_chunks(images, device, max_side)))
    mean, components = fit_pixel_pca(images, device, max_side, max_dims, fit_images, seed)
    return torch.cat([(c - mean) @ components for c in _thumbnail_chunks(images, device, max_side)])
