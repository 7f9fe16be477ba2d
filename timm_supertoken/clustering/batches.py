"""Batches for deep clustering: uint8 images resized, channel-adapted and augmented on the compute device.

Grayscale sets stay 1-channel and the model is built with `in_chans=1` (timm adapts every embedding
to it); pass `in_chans=3` to replicate the channel instead. Random parameters are drawn by the caller
from a seeded CPU generator (a few numbers per image), and the pixels are transformed in one batched
`grid_sample` on the device: runs are reproducible on any device and a DDP rank can take its slice of
the global draw. No per-image PIL work.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = ['prepare_batch', 'draw_view_params', 'augmented_view', 'VIEW_CROP_AREA', 'VIEW_ASPECT', 'VIEW_JITTER']

# contrastive views (SimCLR's recipe, scaled to 28² glyphs): crop area fraction, aspect ratio range,
# multiplicative brightness/contrast range, and the probability that the intensity jitter is applied
VIEW_CROP_AREA = (0.35, 1.0)
VIEW_ASPECT = (3 / 4, 4 / 3)
VIEW_JITTER = 0.4
VIEW_JITTER_PROB = 0.8


def _to_model_size(images: torch.Tensor, img_size: int, in_chans: int, device: torch.device) -> torch.Tensor:
    """uint8 (B, C, h, w) -> float in [0, 1], (B, in_chans, S, S) on device."""
    x = images.to(device, non_blocking=True).float().div_(255.)
    c = x.shape[1]
    if c != in_chans:
        if c == 1:
            x = x.expand(-1, in_chans, -1, -1)
        else:
            raise ValueError(f'images have {c} channels; the model expects {in_chans} (only 1 -> N replication is done)')
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
    return x


def _warp(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Resample every image through its own 2×3 affine map (output coords -> input coords), black outside."""
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)


def prepare_batch(images: torch.Tensor, img_size: int, in_chans: int, device: torch.device,
                  aug: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (B, C, h, w) -> normalised float (B, in_chans, S, S) on device, optionally augmented.

    aug holds per-image (scale, shift_x, shift_y) drawn by the caller, so the same draw can be sliced
    across ranks (a two-process run then sees exactly the augmentations of a one-process run).
    Augmentation is a random rescale and translation (one affine resampling, black outside the
    image): digits and clothes have no canonical crop, and flips would turn 2 into a mirrored glyph.
    """
    x = _to_model_size(images, img_size, in_chans, device)
    if aug is not None:
        # resampled at the model's size after the resize, so the identity transform is exact and augmented
        # training images match the un-augmented ones that are embedded
        scale, tx, ty = aug.to(device).unbind(1)
        zero = torch.zeros_like(scale)
        theta = torch.stack([torch.stack([1 / scale, zero, tx], 1), torch.stack([zero, 1 / scale, ty], 1)], 1)
        x = _warp(x, theta)
    return (x - 0.5) / 0.5


def draw_view_params(n: int, generator: torch.Generator, hflip: bool,
                     scale: Tuple[float, float] = VIEW_CROP_AREA, jitter: float = VIEW_JITTER) -> torch.Tensor:
    """Per-image parameters of one contrastive view, (n, 7): crop w, h, centre x, y, flip sign, brightness, contrast.

    A random resized crop covers a `scale` fraction of the image at an aspect ratio in VIEW_ASPECT
    (log-uniform, as torchvision's RandomResizedCrop), placed uniformly inside it; widths and centres
    are in affine_grid units (the whole image spans [-1, 1]). With probability VIEW_JITTER_PROB the
    brightness and contrast factors are drawn from 1 ± jitter, otherwise both are 1.
    """
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_r = torch.empty(n).uniform_(math.log(VIEW_ASPECT[0]), math.log(VIEW_ASPECT[1]), generator=generator)
    w = (area * log_r.exp()).sqrt().clamp(max=1.0)
    h = (area / log_r.exp()).sqrt().clamp(max=1.0)
    centre = (torch.rand(n, 2, generator=generator) * 2 - 1) * (1 - torch.stack([w, h], 1))
    flip = torch.ones(n)
    if hflip:
        flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    factors = torch.empty(n, 2).uniform_(1 - jitter, 1 + jitter, generator=generator)
    factors[torch.rand(n, generator=generator) >= VIEW_JITTER_PROB] = 1.0
    return torch.cat([w[:, None], h[:, None], centre, flip[:, None], factors], 1)


def augmented_view(images: torch.Tensor, img_size: int, in_chans: int, device: torch.device,
                   params: torch.Tensor) -> torch.Tensor:
    """uint8 images -> one normalised contrastive view per image (parameters from `draw_view_params`), on device.

    Crop and flip are one affine resampling at the model's size; then brightness scales the pixels
    and contrast scales their distance to the image's mean, clamped to the valid [0, 1] range.
    """
    x = _to_model_size(images, img_size, in_chans, device)
    w, h, cx, cy, flip, brightness, contrast = params.to(device).unbind(1)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w * flip, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    x = _warp(x, theta)
    x = x * brightness[:, None, None, None]
    mean = x.mean((1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast[:, None, None, None] + mean).clamp_(0, 1)
    return (x - 0.5) / 0.5
