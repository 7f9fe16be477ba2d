"""Paper Fig. 2 on a real photo: where super-token clustering puts each pixel, drawn without trained weights."""
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from .functional.super_token import super_token_affinities, super_token_aggregate
from .runtime import headless_pyplot

__all__ = ['FIGURE_SIZE_IN', 'FIGURE_DPI', 'plot_super_tokens', 'super_token_panel_titles']

FIGURE_SIZE_IN = (15.0, 5.4)
FIGURE_DPI = 100


def _load_photo(img_size: int) -> np.ndarray:
    """scikit-learn's bundled 'china.jpg' (427×640), centre-cropped square and resized: (S, S, 3) in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image('china.jpg')
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(crop.resize((img_size, img_size), Image.BICUBIC), dtype=np.float32) / 255.


def _token_labels(affinity: torch.Tensor, grid: int) -> np.ndarray:
    """Per-pixel index of the arg-max super token, from affinities (1, h, w, grid², 9) -> (h·grid, w·grid)."""
    _, h, w, _, _ = affinity.shape
    k = affinity[0].argmax(-1)  # (h, w, P): which of the 3×3 neighbours won
    rows = torch.arange(h).view(h, 1, 1) + k // 3 - 1
    cols = torch.arange(w).view(1, w, 1) + k % 3 - 1
    labels = (rows * w + cols).view(h, w, grid, grid).permute(0, 2, 1, 3).reshape(h * grid, w * grid)
    return labels.numpy()


def super_token_panel_titles(img_size: int, patch: int, iters: int, grid: Tuple[int, int]) -> Tuple[str, ...]:
    """Titles of the three panels, saying which sizes count pixels and which count super tokens."""
    return (f'input {img_size}×{img_size} px, S⁰ = mean of each {patch}×{patch}-px cell',
            f'arg-max super token of each pixel after t={iters}',
            f'each pixel painted with its super token ({grid[0]}×{grid[1]} tokens)')


def plot_super_tokens(out_dir: Path, img_size: int = 224, patch: int = 16, iters: int = 3) -> Path:
    """Paper Fig. 2 on a real photo: super tokens of the image's own pixels, one per 16×16 cell (14×14 at 224).

    Clustering runs on ImageNet-normalised RGB pixels, so the picture needs no trained weights; the
    model does the same on 28×28 learned stem features with a 2×2 grid.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    plt = headless_pyplot()
    photo = _load_photo(img_size)
    x = torch.from_numpy((photo - np.array(IMAGENET_DEFAULT_MEAN, dtype=np.float32))
                         / np.array(IMAGENET_DEFAULT_STD, dtype=np.float32))
    x = x.permute(2, 0, 1).unsqueeze(0)
    affinity, norm = super_token_affinities(x, patch, iters)
    tokens = super_token_aggregate(x, affinity, norm, patch)[0].permute(1, 2, 0).numpy()  # (h, w, 3)
    labels = _token_labels(affinity, patch)[:img_size, :img_size]

    # each pixel painted with the value of its super token (what the ViT receives), de-normalised
    token_colour = tokens.reshape(-1, 3) * np.array(IMAGENET_DEFAULT_STD) + np.array(IMAGENET_DEFAULT_MEAN)
    painted = np.clip(token_colour[labels], 0., 1.)
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    outlined = photo.copy()
    outlined[edges] = (1.0, 0.9, 0.0)

    fig, axes = plt.subplots(1, 3, figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout='constrained')
    axes[0].imshow(photo)
    for t in range(patch, img_size, patch):
        axes[0].axhline(t - 0.5, color='w', lw=0.6)
        axes[0].axvline(t - 0.5, color='w', lw=0.6)
    titles = super_token_panel_titles(img_size, patch, iters, tokens.shape[:2])
    axes[1].imshow(outlined)
    axes[2].imshow(painted, interpolation='nearest')
    for ax, title in zip(axes, titles):
        ax.set_title(title)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle('Super-token clustering (paper Fig. 2) on the photo\'s own RGB pixels, no trained weights '
                 '- sklearn china.jpg')
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / 'super_tokens.png'
    fig.savefig(path)
    plt.close(fig)
    return path
