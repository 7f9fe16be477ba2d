"""ViT-Small with the three embeddings of paper 000, registered in timm's model registry.

All three share timm's `VisionTransformer` trunk (ViT-S: 384 wide, 12 deep, 6 heads, class token) and
differ only in `embed_layer`:

| model               | embedding (paper)                               | embedding params |
|---------------------|-------------------------------------------------|------------------|
| vit_small_patch     | Table 3: patches -> LN -> Linear -> LN          | 297,600          |
| vit_small_convembed | Table 4 / EarlyConv stem (DESIGN.md §1)         | 1,021,488        |
| vit_small_stconv    | Table 5: conv stem + super-token clustering     | 132,192          |

timm's ViT-S default `mlp_ratio=4` gives ~22M parameters; the paper's 17-18M totals (Tables 6-7)
correspond to `mlp_ratio=3`, reachable as `timm.create_model(name, mlp_ratio=3)`.
"""
from functools import partial
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import resample_abs_pos_embed
from timm.models import VisionTransformer, build_model_with_cfg, generate_default_cfgs, register_model

from ..layers import ConvStemEmbed, PatchLayerNormEmbed, SuperTokenConvEmbed

__all__ = []  # models are reached through timm.create_model

# kwargs that configure the embedding rather than the trunk, per embedding class
_EMBED_KWARGS = {
    PatchLayerNormEmbed: (),
    ConvStemEmbed: ('stem_chs',),
    SuperTokenConvEmbed: ('conv_modules', 'cluster_grid', 'cluster_iters'),
}


def _source_grid_size(model: VisionTransformer, num_tokens: int) -> Optional[Tuple[int, int]]:
    """Token grid the checkpoint was trained at, from the source's recorded image size.

    resample_abs_pos_embed otherwise assumes a square grid, which breaks weights exported at e.g. 160x192.
    """
    size = getattr(model, 'pretrained_model_args', {}).get('img_size')
    if size is None:
        size = getattr(model, 'pretrained_cfg', {}).get('input_size', (3, 224, 224))[-2:]
    size = (size, size) if isinstance(size, int) else tuple(size)
    grid = model.patch_embed.dynamic_feat_size(size)
    # metadata that does not account for every token is stale: fall back to the square assumption
    return grid if grid[0] * grid[1] == num_tokens else None


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: VisionTransformer) -> Dict[str, torch.Tensor]:
    """Unwrap trainer checkpoints and resample the position embedding to the model's token grid."""
    state_dict = state_dict.get('model', state_dict)
    pos_embed = state_dict.get('pos_embed')
    if pos_embed is not None and model.pos_embed is not None and pos_embed.shape != model.pos_embed.shape:
        num_prefix_tokens = 0 if model.no_embed_class else model.num_prefix_tokens
        state_dict = dict(state_dict)
        state_dict['pos_embed'] = resample_abs_pos_embed(
            pos_embed,
            new_size=model.patch_embed.grid_size,
            old_size=_source_grid_size(model, pos_embed.shape[1] - num_prefix_tokens),
            num_prefix_tokens=num_prefix_tokens,
            verbose=True,
        )
    return state_dict


def _create_vit(variant: str, embed_layer: Callable, pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """Bind the embedding's own kwargs into `embed_layer`, then build through timm's builder."""
    embed_kwargs = {k: kwargs.pop(k) for k in _EMBED_KWARGS[embed_layer] if k in kwargs}
    out_indices = kwargs.pop('out_indices', 3)
    return build_model_with_cfg(
        VisionTransformer,
        variant,
        pretrained,
        embed_layer=partial(embed_layer, **embed_kwargs) if embed_kwargs else embed_layer,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls='getter'),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        'url': '',
        'num_classes': 1000,
        'input_size': (3, 224, 224),
        'pool_size': None,
        'crop_pct': 0.9,
        'interpolation': 'bicubic',
        'fixed_input_size': True,
        'mean': IMAGENET_DEFAULT_MEAN,
        'std': IMAGENET_DEFAULT_STD,
        'classifier': 'head',
        'license': 'apache-2.0',
        'paper_ids': 'DOI:10.9728/dcs.2024.25.4.1007',
        **kwargs,
    }


# No pretrained weights are published yet: untagged cfgs only, so no tag points at a missing file.
default_cfgs = generate_default_cfgs({
    'vit_small_patch': _cfg(first_conv='patch_embed.proj'),
    'vit_small_convembed': _cfg(first_conv='patch_embed.stem.0.conv'),
    'vit_small_stconv': _cfg(first_conv='patch_embed.stem.0.conv'),
})

_VIT_SMALL = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)


@register_model
def vit_small_patch(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 with the LayerNorm patch embedding of paper 000 Table 3."""
    return _create_vit('vit_small_patch', PatchLayerNormEmbed, pretrained, **dict(_VIT_SMALL, **kwargs))


@register_model
def vit_small_convembed(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 with EarlyConv's convolutional stem (paper 000 "convolution embedding", Table 1)."""
    return _create_vit('vit_small_convembed', ConvStemEmbed, pretrained, **dict(_VIT_SMALL, **kwargs))


@register_model
def vit_small_stconv(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """ViT-S/16 with the super-token convolutional embedding of paper 000 Table 5."""
    return _create_vit('vit_small_stconv', SuperTokenConvEmbed, pretrained, **dict(_VIT_SMALL, **kwargs))
