"""SimCLR (NT-Xent on two augmented views) for any timm model: the representation stage, and the default rounds.

Why: in pseudo-label mode round 0 has no clusters but k-means on pixels, so training L_ViT on them
teaches the model to reproduce the pixel partition, and eq. 8 then barely moves off that fixed point
(docs/clustering.md). Contrastive pretraining instead learns what stays the same under crops, flips and
intensity changes, so the loop starts from clusters of shape rather than of pixel overlap (read out of
this embedding beside the pixels, `manifold.py`). The embedding is the model's pre-logits feature (the one
the loop clusters); a small MLP projection head carries the loss (SimCLR §4.2). The default rounds
(`rounds='views'`) train eq. 8 on the same two views beside NT-Xent, so the embedding keeps learning
while the clusters pull on it.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.distributed.nn.functional
import torch.nn.functional as F
from timm.layers import Mlp

from ..harness import check_finite, progress
from .batches import VIEW_CROP_AREA, VIEW_JITTER, augmented_view, draw_view_params

__all__ = ['ContrastiveNet', 'projection_head', 'nt_xent', 'train_on_views', 'PROJECTION_DIM']

PROJECTION_DIM = 128
PROJECTION_HIDDEN = 512


def projection_head(embed_dim: int) -> nn.Module:
    """SimCLR's MLP projection (embedding → 512 → 128) that NT-Xent is computed on instead of the embedding."""
    return Mlp(embed_dim, PROJECTION_HIDDEN, PROJECTION_DIM)


class ContrastiveNet(nn.Module):
    """A timm model with a projection head; forward gives (embedding z, logits, projection) in one pass for DDP."""

    def __init__(self, model: nn.Module, projection: nn.Module):
        super().__init__()
        self.model = model
        self.projection = projection

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return z, self.model.get_classifier()(z), self.projection(z)


def nt_xent(p1: torch.Tensor, p2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy: each view must pick its partner among the 2B − 1 others."""
    p = F.normalize(torch.cat([p1, p2]).float(), dim=1)
    sim = p @ p.T / temperature
    sim.fill_diagonal_(float('-inf'))  # a view is not its own positive
    b = p1.shape[0]
    partner = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(p.device)
    return F.cross_entropy(sim, partner)


def train_on_views(train_net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                   epochs: int, batch_size: int, lr: float, temperature: float, hflip: bool, img_size: int,
                   in_chans: int, device: torch.device, seed: int, rank: int = 0, world: int = 1,
                   view_scale: Tuple[float, float] = VIEW_CROP_AREA, color_jitter: float = VIEW_JITTER,
                   targets: Optional[torch.Tensor] = None, assignments: Optional[torch.Tensor] = None,
                   centroids: Optional[torch.Tensor] = None, gamma: float = 0.0,
                   desc: str = 'contrastive') -> Dict[str, float]:
    """Train train_net (a ContrastiveNet, DDP-wrapped or not) on two views per image; the last epoch's mean losses.

    The loss is NT-Xent, plus, when targets (cluster ids per image) are given, L_ViT = the cross-entropy of
    both views' logits against them, plus γ·L_clustering = γ·‖z − μ_c‖² of both views' embeddings to the
    centroid of their image's cluster c when assignments and centroids are given (eq. 8 on strong views,
    beside the instance loss that keeps the embedding learning). The learning rate follows one cosine cycle
    peaking at lr, with a 10% warm-up (OneCycleLR) over all steps. Batch order and view parameters come from
    a generator seeded by `seed` and drawn for the global batch, each rank taking its slice; the projections
    are all-gathered, so DDP computes the one-process loss. view_scale and color_jitter set the views'
    crop-area range and brightness/contrast strength (`draw_view_params`).
    """
    train_net.train()
    n = images.shape[0]
    batch_size = min(batch_size, n - n % world)
    steps = max(n // batch_size, 1)
    local = batch_size // world
    gen = torch.Generator().manual_seed(seed)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps, pct_start=0.1)
    use_clust = centroids is not None and gamma > 0
    if targets is not None:
        targets = targets.to(images.device)
    if use_clust:
        assignments = assignments.to(images.device)
    for epoch in range(epochs):
        # drawn on the CPU generator (reproducible on any device), then moved once per epoch, not per step
        perm = torch.randperm(n, generator=gen).to(images.device)
        views = [draw_view_params(n, gen, hflip, view_scale, color_jitter).to(images.device) for _ in range(2)]
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        # off a terminal one line per epoch, as the rounds print: a log then shows how long an epoch takes
        bar = progress(range(steps), f'{desc} ep {epoch + 1}/{epochs}', enabled=rank == 0)
        for step in bar:
            idx = perm[step * batch_size:(step + 1) * batch_size][rank * local:(rank + 1) * local]
            x1, x2 = (augmented_view(images[idx], img_size, in_chans, device, v[idx]) for v in views)
            z, logits, proj = train_net(torch.cat([x1, x2]))
            p1, p2 = proj.chunk(2)
            if world > 1:
                # every rank scores the whole global batch, so the negatives are those of a one-process run;
                # all_gather's backward sums the ranks' gradients and DDP averages them: the global loss's gradient
                p1, p2 = (torch.cat(torch.distributed.nn.functional.all_gather(p)) for p in (p1, p2))
            loss_contrastive = nt_xent(p1, p2, temperature)
            loss_vit = loss_clust = torch.zeros((), device=device)
            if targets is not None:
                loss_vit = F.cross_entropy(logits.float(), targets[idx].to(device).repeat(2))
            if use_clust:
                mu = centroids[assignments[idx].to(device).repeat(2)]
                loss_clust = (z.float() - mu).pow(2).sum(1).mean()  # eq. 7
            loss = loss_contrastive + loss_vit + gamma * loss_clust
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            sums += torch.stack([loss, loss_contrastive, loss_vit, loss_clust]).detach().double()
        if world > 1:
            torch.distributed.all_reduce(sums)
        means = (sums / (steps * world)).tolist()
        check_finite(means[0], f'{desc} loss in epoch {epoch + 1}', f'lower the learning rate (now {lr})')
    return dict(zip(('loss', 'loss_contrastive', 'loss_vit', 'loss_clustering'), means))
