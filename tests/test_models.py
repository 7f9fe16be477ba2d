"""The registered models: the paper's three ViT-S (parameter counts, per-layer shapes of Tables 3-5, kwargs,
sizes) and the same embeddings on ViT-Ti and ViT-B; documented parameter counts are the models' own."""
import re
from pathlib import Path

import pytest
import timm
import torch

import timm_supertoken
from loop_reference import super_token_clustering_loop
from timm_supertoken.models import checkpoint_filter_fn
from timm_supertoken.models.parameters import (
    TABLE_END, TABLE_START, count_parameters, parameter_markdown, parameter_rows)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ('vit_small_patch', 'vit_small_convembed', 'vit_small_stconv')
EMBEDDINGS = ('patch', 'convembed', 'stconv')
# timm's usual ViT widths and heads, and the timm model whose trunk each size shares
SIZES = {'tiny': (192, 3, 'vit_tiny_patch16_224'), 'small': (384, 6, 'vit_small_patch16_224'),
         'base': (768, 12, 'vit_base_patch16_224')}
FAMILY = tuple(f'vit_{size}_{embedding}' for size in SIZES for embedding in EMBEDDINGS)


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_in_timm():
    assert set(NAMES) == set(timm_supertoken.MODEL_NAMES)
    assert set(FAMILY) == set(timm_supertoken.REGISTERED_MODEL_NAMES) == set(timm.list_models(module='supertoken_vit'))
    assert set(NAMES) <= set(timm.list_models('vit_small_*'))
    assert not set(FAMILY) & set(timm.list_pretrained()), 'no tag may point at weights that do not exist'


@pytest.mark.parametrize('size', SIZES)
@pytest.mark.parametrize('embedding', EMBEDDINGS)
def test_family_width_heads_and_trunk(size, embedding):
    """Each size is timm's ViT of that size with only the embedding swapped; embedding kwargs work at every size."""
    width, heads, timm_vit = SIZES[size]
    with torch.device('meta'):
        model = timm.create_model(f'vit_{size}_{embedding}')
        reference = timm.create_model(timm_vit)
        if embedding == 'stconv':
            ablation = timm.create_model(f'vit_{size}_stconv', conv_modules=4, cluster_iters=2)
            assert ablation.patch_embed.cluster.grid == 4 and ablation.patch_embed.cluster.iters == 2
            assert timm.create_model(f'vit_{size}_stconv', cluster_grid=4).patch_embed.grid_size == (7, 7)
    assert (model.embed_dim, model.blocks[0].attn.num_heads, len(model.blocks)) == (width, heads, 12)
    assert model.patch_embed.grid_size == (14, 14)
    assert _count(model) - _count(model.patch_embed) == _count(reference) - _count(reference.patch_embed)


@pytest.mark.parametrize('size', SIZES)
def test_stem_channels_scale_as_the_designs_say(size):
    """EarlyConv's stem is D/8, D/4, D/2, D wide; the super-token stem is fixed 16..64 channels + Linear(64, D)."""
    width = SIZES[size][0]
    with torch.device('meta'):
        conv = timm.create_model(f'vit_{size}_convembed').patch_embed
        stconv = timm.create_model(f'vit_{size}_stconv').patch_embed
    assert [block.conv.out_channels for block in conv.stem] == [width // 8, width // 4, width // 2, width]
    assert [module.conv.out_channels for module in stconv.stem] == [16, 32, 32, 64, 64, 64]
    assert (stconv.proj.in_features, stconv.proj.out_features) == (64, width)


def test_models_doc_table_is_generated_from_the_models():
    text = (ROOT / 'docs' / 'models.md').read_text(encoding='utf-8')
    table = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert table == parameter_markdown(parameter_rows()), 'regenerate: python -m timm_supertoken.models.parameters docs/models.md'


def test_readme_parameter_counts_are_the_models():
    readme = (ROOT / 'README.md').read_text(encoding='utf-8')
    for name in NAMES:
        embed, _ = count_parameters(name)
        assert re.search(rf'^\| `{name}` \|.*\| {embed:,} \|', readme, re.MULTILINE), name
    _, total = count_parameters('vit_small_stconv', mlp_ratio=3, num_classes=100)
    stated = re.search(r"paper_size = timm.create_model\('vit_small_stconv', mlp_ratio=3, num_classes=100\) +"
                       r"# ([\d.]+)M parameters", readme)
    assert stated and stated.group(1) == f'{total / 1e6:.1f}'


@pytest.mark.parametrize('name,expected', [
    ('vit_small_patch', 297_600),  # paper Table 1: 0.30M
    ('vit_small_convembed', 1_021_488),  # paper Table 1: 1.00M (EarlyConv stem, docs/design.md §1)
    ('vit_small_stconv', 132_192),  # paper Table 5 (six conv modules + Linear); Table 1 says 0.09M
])
def test_embedding_parameter_counts(name, expected):
    model = timm.create_model(name)
    assert _count(model.patch_embed) == expected
    trunk = _count(model) - _count(model.patch_embed)
    assert trunk == _count(timm.create_model('vit_small_patch16_224')) - _count(
        timm.create_model('vit_small_patch16_224').patch_embed)


def test_convembed_within_three_percent_of_table_1():
    assert abs(_count(timm.create_model('vit_small_convembed').patch_embed) / 1.00e6 - 1) <= 0.03


@pytest.mark.parametrize('name', NAMES)
def test_mlp_ratio_3_gives_the_papers_trunk(name):
    """Paper Tables 6-7 report 17.7-17.9M parameters with a 100-class head: that is mlp_ratio=3, not timm's 4."""
    model = timm.create_model(name, mlp_ratio=3, num_classes=100)
    assert abs((_count(model) - _count(model.patch_embed)) / 17.7e6 - 1) < 0.01  # Table 7, "w/o conv module"


def test_stconv_total_matches_table_7():
    assert abs(_count(timm.create_model('vit_small_stconv', mlp_ratio=3, num_classes=100)) / 17.9e6 - 1) < 0.01


def _shapes(module: torch.nn.Module, x: torch.Tensor, layers) -> list:
    shapes = []
    hooks = [layer.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for layer in layers]
    module(x)
    for hook in hooks:
        hook.remove()
    return shapes


def test_stconv_layer_shapes_table_5():
    embed = timm.create_model('vit_small_stconv').patch_embed.eval()
    layers = list(embed.stem) + [embed.cluster, embed.proj]
    assert _shapes(embed, torch.randn(1, 3, 224, 224), layers) == [
        (1, 16, 112, 112), (1, 32, 112, 112), (1, 32, 56, 56), (1, 64, 56, 56), (1, 64, 28, 28), (1, 64, 28, 28),
        (1, 64, 14, 14),  # super-token clustering, 2×2 grid
        (1, 14, 14, 384),  # FC
    ]
    assert [type(m).__name__ for m in embed.stem[0]] == ['Conv2d', 'GELU', 'BatchNorm2d']  # eq. 1 order


def test_convembed_layer_shapes():
    embed = timm.create_model('vit_small_convembed').patch_embed.eval()
    layers = list(embed.stem) + [embed.proj]
    assert _shapes(embed, torch.randn(1, 3, 224, 224), layers) == [
        (1, 48, 112, 112), (1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 384, 14, 14)]


def test_patch_layer_shapes_table_3():
    embed = timm.create_model('vit_small_patch').patch_embed.eval()
    layers = [embed.patchify, embed.norm_patch, embed.proj, embed.norm]
    assert _shapes(embed, torch.randn(1, 3, 224, 224), layers) == [
        (1, 14, 14, 768), (1, 14, 14, 768), (1, 14, 14, 384), (1, 14, 14, 384)]


@pytest.mark.parametrize('name', NAMES)
def test_forward_shapes(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model.patch_embed(x).shape == (2, 196, 384)
        assert model.forward_features(x).shape == (2, 197, 384)
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize('conv_modules,grid,channels,params', [
    (0, 16, 3, 1_536), (1, 8, 16, 7_008), (2, 8, 32, 17_856), (4, 4, 64, 58_080), (6, 2, 64, 132_192),
    (7, 1, 64, 169_248),
])
def test_table_7_conv_module_ablation(conv_modules, grid, channels, params):
    embed = timm.create_model('vit_small_stconv', conv_modules=conv_modules).patch_embed.eval()
    assert embed.cluster.grid == grid and embed.proj.in_features == channels
    assert _count(embed) == params
    with torch.no_grad():
        assert embed(torch.randn(1, 3, 224, 224)).shape == (1, 196, 384)  # 196 tokens at every depth


@pytest.mark.parametrize('iters', [1, 2, 3, 4])
def test_table_8_iterations(iters):
    model = timm.create_model('vit_small_stconv', cluster_iters=iters).eval()
    assert model.patch_embed.cluster.iters == iters
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


def test_cluster_grid_kwarg_changes_the_token_stride():
    model = timm.create_model('vit_small_stconv', cluster_grid=4)
    assert model.patch_embed.grid_size == (7, 7) and model.pos_embed.shape == (1, 50, 384)
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 224, 224)).shape == (1, 1000)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('img_size', [160, (192, 256)])
def test_other_img_size(name, img_size):
    model = timm.create_model(name, img_size=img_size).eval()
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    assert model.patch_embed.grid_size == (h // 16, w // 16)
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, h, w)).shape == (1, 1 + h // 16 * (w // 16), 384)


@pytest.mark.parametrize('name', NAMES)
@pytest.mark.parametrize('size', [(200, 300), (97, 129)])
def test_dynamic_img_size_matches_a_model_built_for_that_size(name, size):
    """dynamic_img_size resamples the position embedding per call; it must equal a model made for H×W."""
    pad = dict(dynamic_img_pad=True) if name == 'vit_small_patch' else {}  # patchify needs it, convs pad anyway
    torch.manual_seed(0)
    dynamic = timm.create_model(name, dynamic_img_size=True, **pad).eval()
    fixed = timm.create_model(name, img_size=size, **pad).eval()
    fixed.load_state_dict(checkpoint_filter_fn(dynamic.state_dict(), fixed))
    x = torch.randn(2, 3, *size)
    grid = (-(-size[0] // 16), -(-size[1] // 16))
    with torch.no_grad():
        assert fixed.patch_embed.grid_size == grid
        out = dynamic.forward_features(x)
        assert out.shape == (2, 1 + grid[0] * grid[1], 384)
        torch.testing.assert_close(out, fixed.forward_features(x), rtol=1e-4, atol=1e-4)
        _, intermediates = dynamic.forward_intermediates(x, indices=1)
        assert intermediates[0].shape == (2, 384, *grid)


def test_stconv_embedding_on_odd_sizes_matches_the_loop_reference():
    """End to end through the stem, the padded border cells of the clustering carry no bias."""
    embed = timm.create_model('vit_small_stconv', dynamic_img_size=True, cluster_iters=2).patch_embed.double().eval()
    x = torch.randn(1, 3, 97, 129, dtype=torch.float64)
    with torch.no_grad():
        features = embed.stem(x)
        assert features.shape[-2:] == (13, 17)
        expected = embed.proj(super_token_clustering_loop(features, 2, 2).permute(0, 2, 3, 1))
        torch.testing.assert_close(embed(x), expected)


@pytest.mark.parametrize('name', NAMES)
def test_bad_input_is_named(name):
    model = timm.create_model(name).eval()
    dynamic = timm.create_model(name, dynamic_img_size=True).eval()
    with pytest.raises(Exception, match='expects 3 input channels, got 1'):
        model(torch.randn(1, 1, 224, 224))
    with pytest.raises(Exception, match='floating-point'):
        model(torch.randint(0, 255, (1, 3, 224, 224), dtype=torch.uint8))
    with pytest.raises(Exception, match='does not match the model'):
        model(torch.randn(1, 3, 192, 224))
    with pytest.raises(Exception, match='too small'):
        dynamic(torch.randn(1, 3, 8, 64))


def test_patch_model_names_the_padding_option():
    model = timm.create_model('vit_small_patch', dynamic_img_size=True).eval()
    with pytest.raises(Exception, match='dynamic_img_pad=True'):
        model(torch.randn(1, 3, 97, 129))


def test_stconv_rejects_nan_images_in_the_clustering():
    with pytest.raises(ValueError, match='NaN or Inf'):
        timm.create_model('vit_small_stconv').eval()(torch.full((1, 3, 224, 224), float('nan')))


@pytest.mark.parametrize('kwargs,match', [
    (dict(conv_modules=8), 'conv_modules must be in 0..7'),
    (dict(cluster_grid=0), 'grid must be >= 1'),
    (dict(cluster_iters=0), 'iterations t must be >= 1'),
    (dict(not_a_model_arg=1), 'not_a_model_arg'),
])
def test_bad_kwargs_are_named(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        timm.create_model('vit_small_stconv', **kwargs)


@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
def test_conv_module_is_conv_gelu_bn_in_either_layout(memory_format):
    """Eq. 1 exactly, whatever layout comes in; a channels_last map stays channels_last for the next conv."""
    from timm_supertoken.layers import ConvActNorm
    module = ConvActNorm(8, 16, stride=2).train()
    x = torch.randn(2, 8, 20, 20).contiguous(memory_format=memory_format)
    out = module(x)
    expected = torch.nn.functional.batch_norm(
        torch.nn.functional.gelu(module.conv(x)), None, None, module.bn.weight, module.bn.bias, training=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16])
@pytest.mark.parametrize('memory_format', [torch.channels_last, torch.contiguous_format])
def test_conv_module_inference_runs_in_place_and_matches_eq_1(memory_format, dtype):
    """Eval + no autograd: GELU and BN overwrite the conv output (one buffer per module) with eq. 1's values."""
    from timm_supertoken.layers import ConvActNorm
    module = ConvActNorm(8, 16, stride=1).eval()
    with torch.no_grad():  # statistics a trained BN would have, so the affine map is not the identity
        module.bn.running_mean.normal_()
        module.bn.running_var.uniform_(0.5, 2.0)
        module.bn.weight.uniform_(0.5, 1.5)
        module.bn.bias.normal_()
    module.to(dtype)
    x = torch.randn(2, 8, 20, 20, dtype=dtype).contiguous(memory_format=memory_format)
    expected = module.bn(torch.nn.functional.gelu(module.conv(x)))  # out of place: x requires no grad, params do
    with torch.inference_mode():
        out = module(x)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        module(x)
    ops = {event.key for event in prof.key_averages()}
    assert {'aten::gelu_', 'aten::addcmul'} <= ops and 'aten::batch_norm' not in ops, ops


def test_conv_module_keeps_autograd_and_batch_statistics_out_of_place():
    """Whenever autograd or BN's batch statistics need the intermediate maps, nothing is overwritten."""
    from timm_supertoken.layers import ConvActNorm
    module = ConvActNorm(4, 8, stride=2).eval()
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    module(x).sum().backward()  # gelu_ on a tensor autograd saved would raise here
    assert x.grad is not None and module.conv.weight.grad is not None
    module.train()
    with torch.no_grad():  # BN recalibration: training mode without autograd still updates the running stats
        module(x)
    assert module.bn.num_batches_tracked.item() == 1
    assert not torch.allclose(module.bn.running_mean, torch.zeros(8))
