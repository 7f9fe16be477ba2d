"""The contrastive stage's pieces: batched view augmentation, NT-Xent, and that pretraining learns."""
import math

import numpy as np
import pytest
import torch

from timm_supertoken.clustering import ClusterConfig, create_cluster_model
from timm_supertoken.clustering.batches import augmented_view, draw_view_params, prepare_batch
from timm_supertoken.clustering.contrastive import ContrastiveNet, nt_xent, projection_head, train_on_views
from timm_supertoken.clustering.deep_clustering import EmbedNet, pretrain_representation
from timm_supertoken.data import load_digits_set

CPU = torch.device('cpu')
IDENTITY = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]])


def _ramp(n=2, side=8):
    """Images brighter to the right, so a mirror and a crop are both visible."""
    row = torch.linspace(0, 255, side).round().to(torch.uint8)
    return row.expand(n, 1, side, side).clone()


def test_identity_view_is_the_plain_batch_and_flip_mirrors():
    x = _ramp()
    plain = prepare_batch(x, 16, 1, CPU)
    assert torch.allclose(augmented_view(x, 16, 1, CPU, IDENTITY.expand(2, -1)), plain, atol=1e-6)
    flipped = IDENTITY.clone()
    flipped[0, 4] = -1
    assert torch.allclose(augmented_view(x[:1], 16, 1, CPU, flipped), plain[:1].flip(-1), atol=1e-6)
    # the right half of the image, enlarged: every pixel at least as bright as the plain image's centre
    right_half = torch.tensor([[0.5, 1.0, 0.5, 0.0, 1.0, 1.0, 1.0]])
    crop = augmented_view(x[:1], 16, 1, CPU, right_half)
    assert crop.min() >= plain[0, 0, :, 7].min() - 1e-6 and crop.mean() > plain.mean() + 0.4
    darker = IDENTITY.clone()
    darker[0, 5] = 0.5
    assert torch.allclose((augmented_view(x[:1], 16, 1, CPU, darker) + 1) * 2, plain[:1] + 1, atol=1e-5)


def test_view_parameters_are_seeded_in_range_and_flip_only_when_asked():
    a = draw_view_params(500, torch.Generator().manual_seed(1), hflip=True)
    b = draw_view_params(500, torch.Generator().manual_seed(1), hflip=True)
    assert torch.equal(a, b)
    w, h, cx, cy, flip, brightness, contrast = a.unbind(1)
    assert (w <= 1).all() and (h <= 1).all() and (w * h >= 0.35 * 3 / 4 - 1e-6).all()
    assert (cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all()  # crops stay inside the image
    assert set(flip.tolist()) == {-1.0, 1.0}
    assert ((brightness - 1).abs() <= 0.4 + 1e-6).all() and ((brightness == 1) & (contrast == 1)).any()
    no_flip = draw_view_params(500, torch.Generator().manual_seed(1), hflip=False)
    assert (no_flip[:, 4] == 1).all()


def test_view_scale_and_color_jitter_bound_the_views():
    v = draw_view_params(500, torch.Generator().manual_seed(1), hflip=False, scale=(0.6, 0.8), jitter=0.1)
    w, h, _, _, _, brightness, contrast = v.unbind(1)
    area = w * h  # the aspect clamp can only shrink a side, never grow the area past the drawn one
    assert (area <= 0.8 + 1e-6).all() and (area >= 0.6 * 3 / 4 - 1e-6).all() and area.max() > 0.7
    assert ((brightness - 1).abs() <= 0.1 + 1e-6).all() and ((contrast - 1).abs() <= 0.1 + 1e-6).all()
    assert (brightness != 1).any()
    plain = draw_view_params(500, torch.Generator().manual_seed(1), hflip=False, jitter=0.0)
    assert (plain[:, 5:] == 1).all()


def test_nt_xent_rewards_matching_views():
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(16, 8, generator=gen)
    assert nt_xent(p, p, 0.1) < 0.1  # each view's partner is the one identical vector
    chance = nt_xent(torch.randn(256, 8, generator=gen), torch.randn(256, 8, generator=gen), 0.5)
    assert chance == pytest.approx(math.log(2 * 256 - 1), rel=0.05)


def test_contrastive_pretraining_lowers_nt_xent():
    images = load_digits_set().subset(64, seed=0).images
    cfg = ClusterConfig(model='vit_small_stconv', model_kwargs={'depth': 1, 'embed_dim': 32, 'num_heads': 2},
                        img_size=16)
    torch.manual_seed(0)
    net = ContrastiveNet(create_cluster_model(cfg, num_classes=10, in_chans=1), projection_head(32))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = [train_on_views(net, opt, images, epochs, 32, 3e-3, 0.5, False, 16, 1, CPU, seed=0)['loss_contrastive']
              for epochs in (1, 4)]
    assert losses[0] > losses[1] + 0.1, losses


def test_representation_stage_sizes_its_head_for_a_cnn_whose_last_map_is_one_pixel():
    # resnet10t at 16² ends on a 1×1 map: sizing the projection head in training mode would hand its
    # BatchNorm one value per channel
    cfg = ClusterConfig(model='resnet10t', img_size=16, pretrain_epochs=1, pretrain_batch_size=16)
    net = EmbedNet(create_cluster_model(cfg, 10, 1)).train()
    images = load_digits_set().subset(32, seed=0).images
    stage = pretrain_representation(net, images, cfg, 1, CPU)
    assert np.isfinite(stage['loss_contrastive']) and net.training
