"""Batches for deep clustering: uint8 images resized, channel-adapted and augmented on the compute device.

Grayscale sets stay 1-channel and the model is built with `in_chans=1` (timm adapts every embedding
to it); pass `in_chans=3` to replicate the channel instead.
"""
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ['prepare_batch']


def prepare_batch(images: torch.Tensor, img_size: int, in_chans: int, device: torch.device,
                  aug: Optional[torch.Tensor] = None) -> torch.Tensor:
    """uint8 (B, C, h, w) -> normalised float (B, in_chans, S, S) on device, optionally augmented.

    aug holds per-image (scale, shift_x, shift_y) drawn by the caller, so the same draw can be sliced
    across ranks (a two-process run then sees exactly the augmentations of a one-process run).
    Augmentation is a random rescale and translation (one affine resampling, black outside the
    image): digits and clothes have no canonical crop, and flips would turn 2 into a mirrored glyph.
    """
    x = images.to(device, non_blocking=True).float().div_(255.)
    c = x.shape[1]
    if c != in_chans:
        if c == 1:
            x = x.expand(-1, in_chans, -1, -1)
        else:
            raise ValueError(f'images have {c} channels; the model expects {in_chans} (only 1 -> N replication is done)')
    if x.shape[-1] != img_size or x.shape[-2] != img_size:
        x = F.interpolate(x, size=(img_size, img_size), mode='bilinear', align_corners=False)
    if aug is not None:
        # resampled at the model's size after the resize, so the identity transform is exact and augmented
        # training images match the un-augmented ones that are embedded
        scale, tx, ty = aug.to(device).unbind(1)
        zero = torch.zeros_like(scale)
        theta = torch.stack([torch.stack([1 / scale, zero, tx], 1), torch.stack([zero, 1 / scale, ty], 1)], 1)
        grid = F.affine_grid(theta, [x.shape[0], in_chans, img_size, img_size], align_corners=False)
        x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros', align_corners=False)
    return (x - 0.5) / 0.5
