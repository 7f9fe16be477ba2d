"""The three token embeddings compared in *Lightweight ViT Convolutional Embedding Module Based on Super-Token Clustering*,
as drop-in `embed_layer`s for timm's VisionTransformer.

Each one maps a (B, C, H, W) image to a grid of ⌈H/16⌉×⌈W/16⌉ tokens (196 at 224×224) and follows the
contract of `timm.layers.PatchEmbed` (img_size / grid_size / num_patches, feat_ratio, dynamic_feat_size,
set_input_size, output_fmt), so every VisionTransformer feature keeps working with it.
"""
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from timm.layers import ConvNormAct, Format, _assert, nhwc_to, to_2tuple

from .super_token import SuperTokenClustering, is_traced_or_exported

__all__ = ['PatchEmbedArgs', 'TokenEmbed', 'Patchify', 'PatchLayerNormEmbed', 'ConvStemEmbed', 'SuperTokenConvEmbed',
           'ConvActNorm']

SizeType = Union[int, Tuple[int, int]]


@dataclass
class PatchEmbedArgs:
    """timm's PatchEmbed arguments, which VisionTransformer passes to any `embed_layer`: written once for all.

    Each embedding names its own options and takes these as keyword arguments.
    """
    img_size: Optional[SizeType] = 224
    patch_size: int = 16
    in_chans: int = 3
    embed_dim: int = 768
    bias: bool = True
    flatten: bool = True
    output_fmt: Optional[str] = None
    strict_img_size: bool = True
    dynamic_img_pad: bool = False
    device: Any = None
    dtype: Optional[torch.dtype] = None

    @property
    def dd(self) -> Dict[str, Any]:
        """Factory kwargs for the embedding's parameters (timm's `dd`)."""
        return {'device': self.device, 'dtype': self.dtype}


class TokenEmbed(nn.Module):
    """Shared image -> token-grid bookkeeping; subclasses build their layers from PatchEmbedArgs."""
    output_fmt: Format
    flatten: torch.jit.Final[bool]
    strict_img_size: torch.jit.Final[bool]
    dynamic_img_pad: torch.jit.Final[bool]

    def __init__(self, args: PatchEmbedArgs, token_stride: SizeType) -> None:
        super().__init__()
        self.in_chans = args.in_chans
        self.embed_name = type(self).__name__  # a plain attribute, so error messages survive TorchScript
        self.patch_size = to_2tuple(token_stride)
        if args.output_fmt is not None:
            self.flatten = False
            self.output_fmt = Format(args.output_fmt)
        else:
            self.flatten = args.flatten
            self.output_fmt = Format.NCHW
        self.strict_img_size = args.strict_img_size
        self.dynamic_img_pad = args.dynamic_img_pad
        self.img_size, self.grid_size, self.num_patches = self._init_img_size(args.img_size)

    def _rounds_up(self) -> bool:
        """Whether a partial border patch becomes a token (convolutions pad, plain patchify needs dynamic_img_pad)."""
        return True

    def _init_img_size(self, img_size: Optional[SizeType]):
        if img_size is None:
            return None, None, None
        img_size = to_2tuple(img_size)
        grid_size = self.dynamic_feat_size(img_size)
        return img_size, grid_size, grid_size[0] * grid_size[1]

    def feat_ratio(self, as_scalar: bool = True) -> Union[Tuple[int, int], int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: Tuple[int, int]) -> Tuple[int, int]:
        """Token grid for an image size; torchscript-friendly fixed tuple indexing as in timm's PatchEmbed."""
        if self._rounds_up():
            return math.ceil(img_size[0] / self.patch_size[0]), math.ceil(img_size[1] / self.patch_size[1])
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def set_input_size(self, img_size: Optional[SizeType] = None, patch_size: Optional[SizeType] = None) -> None:
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError(
                f'{type(self).__name__} has a fixed token stride of {self.patch_size}; '
                f'it cannot be changed to {to_2tuple(patch_size)}')
        img_size = img_size or self.img_size
        if img_size is not None and to_2tuple(img_size) != self.img_size:
            self.img_size, self.grid_size, self.num_patches = self._init_img_size(img_size)

    def check_image(self, x: torch.Tensor) -> None:
        """Name what is wrong with an input image before a convolution fails on it cryptically."""
        _assert(x.ndim == 4, f'{self.embed_name} expects a (B, C, H, W) image batch, got {x.ndim} dims')
        _assert(x.shape[1] == self.in_chans,
                f'{self.embed_name} expects {self.in_chans} input channels, got {x.shape[1]} (shape {x.shape})')
        _assert(x.is_floating_point(),
                f'{self.embed_name} expects a floating-point image (normalised as in the pretrained cfg), got {x.dtype}')
        # one `_assert` per comparison: under torch.fx the sizes are proxies, and `a and b` would need their
        # truth value at trace time, while `_assert` itself is wrapped and lands in the graph
        H, W = x.shape[2], x.shape[3]
        too_small = (f'image {H}x{W} is too small for {self.embed_name}: it needs at least '
                     f'{self.patch_size[0]}x{self.patch_size[1]} pixels (one token)')
        _assert(H >= self.patch_size[0], too_small)
        _assert(W >= self.patch_size[1], too_small)
        if self.img_size is not None and self.strict_img_size:
            mismatch = (f'input size {H}x{W} does not match the model ({self.img_size[0]}x{self.img_size[1]}); '
                        f'create the model with img_size=({H}, {W}) or dynamic_img_size=True')
            _assert(H == self.img_size[0], mismatch)
            _assert(W == self.img_size[1], mismatch)

    def format_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """NHWC tokens -> the layout VisionTransformer asked for (flattened NLC by default)."""
        if self.flatten:
            return x.flatten(1, 2)
        return nhwc_to(x, self.output_fmt)


class Patchify(nn.Module):
    """Non-overlapping patches, (B, C, H, W) -> (B, H/p, W/q, p·q·C), channel fastest within a patch.

    The layout of einops' 'b c (h p) (w q) -> b h w (p q c)', written as reshape / permute because einops
    caches its recipe keyed by the input shape, which torch.fx symbolic tracing cannot provide (a Proxy).
    """

    def __init__(self, patch_size: Tuple[int, int]) -> None:
        super().__init__()
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p, q = self.patch_size
        x = x.reshape(B, C, H // p, p, W // q, q).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(B, H // p, W // q, p * q * C)

    def extra_repr(self) -> str:
        return f'patch_size={self.patch_size}'


class PatchLayerNormEmbed(TokenEmbed):
    """Patch embedding of paper Table 3: 16×16 patches -> LayerNorm(768) -> Linear(768→D) -> LayerNorm(D).

    297,600 parameters at D=384 (paper Table 1: 0.30M). Keyword arguments: `PatchEmbedArgs` (timm's PatchEmbed).
    """

    def __init__(self, **kwargs: Any) -> None:
        args = PatchEmbedArgs(**kwargs)
        super().__init__(args, args.patch_size)
        p, q = self.patch_size
        patch_dim = args.in_chans * p * q
        self.patchify = Patchify(self.patch_size)
        self.norm_patch = nn.LayerNorm(patch_dim, **args.dd)
        self.proj = nn.Linear(patch_dim, args.embed_dim, bias=args.bias, **args.dd)
        self.norm = nn.LayerNorm(args.embed_dim, **args.dd)

    def _rounds_up(self) -> bool:
        return self.dynamic_img_pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image(x)
        H, W = x.shape[2], x.shape[3]
        if self.dynamic_img_pad:
            pad_h = (self.patch_size[0] - H % self.patch_size[0]) % self.patch_size[0]
            pad_w = (self.patch_size[1] - W % self.patch_size[1]) % self.patch_size[1]
            x = nn.functional.pad(x, (0, pad_w, 0, pad_h))
        else:
            not_multiple = (f'input size {H}x{W} is not a multiple of the patch size {self.patch_size}; '
                            f'pass dynamic_img_pad=True to pad it')
            _assert(H % self.patch_size[0] == 0, not_multiple)
            _assert(W % self.patch_size[1] == 0, not_multiple)
        x = self.norm(self.proj(self.norm_patch(self.patchify(x))))
        return self.format_tokens(x)


class ConvStemEmbed(TokenEmbed):
    """EarlyConv's convolutional stem (Xiao et al., NeurIPS 2021), the paper's "convolution embedding".

    Four 3×3 stride-2 Conv-BN-ReLU with D/8, D/4, D/2, D channels (48, 96, 192, 384 at D=384), then a
    1×1 conv to D. 1,021,488 parameters at D=384 (paper Table 1: 1.00M; its Table 4's 96-384 channel
    stem would be 3.5M and contradicts Table 1, see docs/design.md §1). Keyword arguments besides `stem_chs`:
    `PatchEmbedArgs` (timm's PatchEmbed).
    """

    def __init__(self, stem_chs: Optional[Sequence[int]] = None, **kwargs: Any) -> None:
        args = PatchEmbedArgs(**kwargs)
        D = args.embed_dim
        stem_chs = tuple(stem_chs or (D // 8, D // 4, D // 2, D))
        super().__init__(args, 2 ** len(stem_chs))
        if self.patch_size != to_2tuple(args.patch_size):
            raise ValueError(f'a {len(stem_chs)}-conv stride-2 stem has token stride {self.patch_size[0]}, '
                             f'not the requested patch_size={args.patch_size}')
        chs = (args.in_chans,) + stem_chs
        self.stem = nn.Sequential(*[
            ConvNormAct(chs[i], chs[i + 1], kernel_size=3, stride=2, **args.dd) for i in range(len(stem_chs))
        ])
        self.proj = nn.Conv2d(chs[-1], D, kernel_size=1, bias=args.bias, **args.dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image(x)
        x = self.proj(self.stem(x.contiguous(memory_format=torch.channels_last)))
        return self.format_tokens(x.permute(0, 2, 3, 1))


class ConvActNorm(nn.Sequential):
    """The paper's convolution module, eq. 1: Conv3×3 -> GELU -> BatchNorm (in that order).

    The stem runs channels_last, and GELU is applied to the NHWC view of the conv output: PyTorch's CPU
    GELU vectorises a contiguous tensor but not a channels_last NCHW one; the view has the same memory,
    so values and layout are unchanged.

    Inference (BatchNorm in eval mode and a conv output that needs no gradient, e.g. under
    `torch.inference_mode()`) runs GELU and the BatchNorm's affine map in place on the conv output: one
    buffer per module instead of three, where on the CPU every fresh multi-MB buffer costs a page fault
    per 4 KiB page. Training, and anything autograd records, keeps the out-of-place modules (GELU's
    backward needs its input).

    The BN is not folded into the next conv: GELU keeps it out of its own conv, and the next conv
    zero-pads the normalised map, i.e. pads the raw map with -shift/scale per channel, so an exact fold
    needs a border correction whose small ops cost what the in-place BN pass does (docs/kernels.md).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, device=None, dtype=None) -> None:
        dd = {'device': device, 'dtype': dtype}
        super().__init__()
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size=3, stride=stride, padding=1, **dd)
        self.act = nn.GELU()
        self.bn = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if not torch.jit.is_scripting() and self._can_run_in_place(x):
            return self._forward_in_place(x)
        x = self.act(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.bn(x)

    @torch.jit.unused
    def _can_run_in_place(self, x: torch.Tensor) -> bool:
        """Whether GELU and BN may overwrite the conv output: no autograd graph holds it, BN uses fixed statistics."""
        if is_traced_or_exported(x):
            return False
        return not x.requires_grad and not self.bn.training and self.bn.running_var is not None

    @torch.jit.unused
    def _forward_in_place(self, x: torch.Tensor) -> torch.Tensor:
        """GELU, then the eval BN y = x·γ/√(σ²+ε) + β - μ·γ/√(σ²+ε), each one pass in place on the conv output."""
        torch.ops.aten.gelu_(x.permute(0, 2, 3, 1), approximate=self.act.approximate)
        bn = self.bn
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        return torch.addcmul(shift[:, None, None], x, scale[:, None, None], out=x)


class SuperTokenConvEmbed(TokenEmbed):
    """Super-token convolutional embedding of paper Table 5: a light conv stem, super-token clustering, Linear.

    Conv modules (eq. 1) alternate stride 2 and 1 with 16, 32, 32, 64, 64, 64 channels (224² -> 28²×64),
    super-token clustering on a 2×2 grid with t=3 (28² -> 14²), then Linear(64→D): 132,192 parameters
    at D=384. `conv_modules` reaches the paper's Table 7 ablation: 0, 1, 2, 4, 6, and 7 (6 plus the
    extra stride-2 conv to 14×14); by default the clustering grid is chosen so the token stride stays
    `patch_size` (grid 16, 8, 8, 4, 2, 1 for those depths), keeping 196 tokens at 224×224. Keyword
    arguments besides those three: `PatchEmbedArgs` (timm's PatchEmbed).
    """
    STEM_CHS = (16, 32, 32, 64, 64, 64, 64)

    def __init__(self, conv_modules: int = 6, cluster_grid: Optional[int] = None, cluster_iters: int = 3,
                 **kwargs: Any) -> None:
        args = PatchEmbedArgs(**kwargs)
        if not 0 <= conv_modules <= len(self.STEM_CHS):
            raise ValueError(f'conv_modules must be in 0..{len(self.STEM_CHS)} (paper Table 7), got {conv_modules}')
        stem_stride = 2 ** math.ceil(conv_modules / 2)  # modules 1, 3, 5, 7 have stride 2
        if cluster_grid is None:
            if args.patch_size % stem_stride:
                raise ValueError(f'patch_size={args.patch_size} is not a multiple of the stem stride {stem_stride}')
            cluster_grid = args.patch_size // stem_stride
        cluster = SuperTokenClustering(grid=cluster_grid, iters=cluster_iters)  # validates grid and t first
        super().__init__(args, stem_stride * cluster_grid)
        chs = (args.in_chans,) + self.STEM_CHS[:conv_modules]
        self.stem = nn.Sequential(*[
            ConvActNorm(chs[i], chs[i + 1], stride=2 if i % 2 == 0 else 1, **args.dd) for i in range(conv_modules)
        ])
        self.cluster = cluster
        self.proj = nn.Linear(chs[-1], args.embed_dim, bias=args.bias, **args.dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_image(x)
        # channels_last end to end: NHWC convolutions and BatchNorm (no layout conversions in cuDNN or
        # oneDNN), clustering reads NHWC in place and returns NHWC super tokens, so the permute below is
        # a free view and the Linear reads contiguous rows
        x = self.cluster(self.stem(x.contiguous(memory_format=torch.channels_last)))
        x = self.proj(x.permute(0, 2, 3, 1))
        return self.format_tokens(x)
