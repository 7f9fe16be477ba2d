"""GMACs and activations of a model at its input size, counted the way timm's model cards report them.

timm's cards give multiply-accumulates (not FLOPs) and activations as the output elements of every
convolution and matrix product, with attention counted as its two products (QKᵀ and AV), whether or not
the model runs a fused kernel. Counting at the ATen level sees the same operations on any backend, so the
numbers come from the model itself rather than from a formula that could drift from it.
"""
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ['Complexity', 'model_input_size', 'measure_complexity']

_aten = torch.ops.aten
_MATMULS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default, _aten.baddbmm.default}


@dataclass(frozen=True)
class Complexity:
    """Counts for one image: multiply-accumulates and activations (output elements of convs and products)."""
    macs: int
    activations: int
    input_size: Tuple[int, int, int]

    @property
    def gmacs(self) -> float:
        return self.macs / 1e9

    @property
    def activations_m(self) -> float:
        return self.activations / 1e6


class _CountMode(TorchDispatchMode):
    """Adds up MACs and output elements of the ops that timm's cards count, as they are dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.activations = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            a, b = args[-2], args[-1]  # addmm/baddbmm take the bias first
            self.macs += out.numel() * a.shape[-1]
            self.activations += out.numel()
        elif func is _aten.convolution.default:
            weight = args[1]
            self.macs += out.numel() * math.prod(weight.shape[1:])
            self.activations += out.numel()
        elif func.__name__.startswith('_scaled_dot_product'):
            q, k, v = args[:3]
            scores = q.numel() // q.shape[-1] * k.shape[-2]  # B·h·Nq·Nk
            self.macs += scores * (q.shape[-1] + v.shape[-1])
            self.activations += scores + q.numel() // q.shape[-1] * v.shape[-1]
        return out


def model_input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) the model was built for: a ViT's embedding knows it after `img_size=`, pretrained_cfg does not."""
    channels, height, width = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))  # timm's default
    embed = getattr(model, 'patch_embed', None)
    if getattr(embed, 'img_size', None) is not None:
        height, width = embed.img_size
        channels = getattr(embed, 'in_chans', channels)
    return channels, height, width


def measure_complexity(model: torch.nn.Module, input_size: Optional[Sequence[int]] = None) -> Complexity:
    """Count one image's MACs and activations at `input_size` (C, H, W; default: what the model was built for)."""
    input_size = tuple(input_size or model_input_size(model))
    param = next(model.parameters())
    x = torch.zeros(1, *input_size, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _CountMode() as counter:
            model(x)
    finally:
        model.train(was_training)
    return Complexity(counter.macs, counter.activations, input_size)  # type: ignore[arg-type]

