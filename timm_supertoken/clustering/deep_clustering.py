"""ViT deep clustering (*Deep Clustering Based on Vision Transformer (ViT) for Images*, §3): train, embed,
k-means, retrain with L = L_ViT + γ·L_clustering, repeat.

In pseudo-label mode a contrastive representation stage (SimCLR, `contrastive.py`) runs first, and the
readout gives round 0 its targets: k-means on a UMAP layout (`manifold.py`) of the pixels and that
embedding side by side, or `readout='kmeans'`, k-means on the embedding alone. `pretrain='none'` reads
out the pixels alone.

Works for any timm model: the embedding of an image is its pre-logits feature,
`model.forward_head(model.forward_features(x), pre_logits=True)`, and the logits are the model's
classifier applied to it. One process or many under `torchrun` (DDP; every rank clusters the same
gathered embeddings). Every round is checkpointed, and `resume=True` continues a killed run.
"""
import copy
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..config_fields import config_from_options, field_help
from ..data.image_sets import FASHION_MNIST_DIR, ImageSet, load_dataset
from ..harness import (DEVICE_HELP, DistributedEnv, SeedPurpose, check_finite, check_same_run, derive_seed,
                       load_for_resume, on_terminal, progress, save_atomic, seeded_global_rngs, shard_range,
                       write_metrics)
from ..harness import log as log_line
from ..runtime import create_model_at_size
from .batches import VIEW_CROP_AREA, VIEW_JITTER, prepare_batch
from .features import pixel_features
from .contrastive import ContrastiveNet, projection_head, train_on_views
from .kmeans import KMeansResult, check_embeddings, kmeans
from .manifold import joint_features, umap_layout
from .metrics import cluster_metrics, match_clusters, nmi
from .plots import plot_cluster_grid, plot_nmi_curve

__all__ = ['ClusterConfig', 'ClusterData', 'EmbedNet', 'PRETRAIN_METHODS', 'READOUTS', 'ROUNDS', 'TARGETS',
           'DEFAULT_MODEL', 'DEFAULT_MODEL_KWARGS', 'DATASET_DEFAULTS', 'GENERAL_DEFAULTS', 'dataset_family',
           'for_dataset', 'data_and_config_from', 'check_run', 'create_embed_net', 'create_projection',
           'pretrain_method', 'describe_readout', 'describe_rounds', 'pretrain_representation', 'umap_readout',
           'create_cluster_model', 'embed', 'train_round', 'run_deep_clustering', 'CHECKPOINT_NAME', 'METRICS_NAME']

CHECKPOINT_NAME = 'checkpoint.pt'
CHECKPOINT_KEYS = ('model', 'optimizer', 'state', 'config', 'n')  # what a resume reads (and 'projection')
# the settings a resumed run must share with the one that wrote the checkpoint
RESUME_KEYS = ('model', 'model_kwargs', 'img_size', 'k', 'targets', 'seed', 'pretrain', 'pretrain_epochs', 'readout',
               'rounds')
METRICS_NAME = 'metrics.json'
# augmentation ranges: isotropic rescale and translation (fraction of the half-width, affine_grid units)
AUG_SCALE = (0.85, 1.15)
AUG_SHIFT = 0.15
PRETRAIN_METHODS = ('simclr', 'none')
READOUTS = ('umap', 'kmeans')
ROUNDS = ('views', 'paper')
TARGETS = ('pseudo', 'true')
# the default model, scaled down so that the default run finishes on 2 CPU cores in minutes: ViT-S width,
# 4 of its 12 blocks, at 32×32
DEFAULT_MODEL = 'vit_small_stconv'
DEFAULT_MODEL_KWARGS: Dict[str, Any] = {'depth': 4}
# the options a dataset chooses when they are not given (None), as `for_dataset` applies them. Digits: no
# contrastive views, which crop whole strokes off an 8×8 glyph and mirror one glyph into another. Fashion-MNIST:
# the default model at width 128, 2 blocks and 16×16, sized so that all 70,000 images cluster on 2 CPU cores
# in under half an hour (docs/clustering.md)
DATASET_DEFAULTS: Dict[str, Dict[str, Any]] = {
    'digits': dict(pretrain='none', hflip=False, rounds='paper'),
    'fashion-mnist': dict(model_kwargs={'depth': 2, 'embed_dim': 128, 'num_heads': 4}, img_size=16, epochs=2,
                          max_rounds=3),
}
# and what every other dataset gets
GENERAL_DEFAULTS: Dict[str, Any] = dict(model_kwargs=DEFAULT_MODEL_KWARGS, img_size=32, epochs=4, max_rounds=5,
                                        hflip=True)
ROUND_LR = {'views': 1e-3, 'paper': 5e-4}  # the views rounds' peak of a one-cycle schedule; the paper's is constant
# checkpoints written before an option existed, resumed: what those runs did
_BEFORE_OPTION = {'readout': 'kmeans', 'rounds': 'paper'}


@dataclass
class ClusterConfig:
    """Every option of a deep-clustering run, saved in checkpoints and metrics.json; `cluster`'s options."""
    model: str = field(default=DEFAULT_MODEL, metadata=field_help('any timm model name'))
    model_kwargs: Optional[Dict[str, Any]] = field(default=None, metadata=field_help(
        'timm.create_model kwargs, e.g. depth=4 embed_dim=192 (default: '
        + ' '.join(f'{k}={v}' for k, v in DEFAULT_MODEL_KWARGS.items())
        + f' for {DEFAULT_MODEL}, scaled down so the default run fits a CPU, and depth=2 embed_dim=128 num_heads=4 '
        'for Fashion-MNIST; none for other models)'))
    img_size: Optional[int] = field(default=None, metadata=field_help(
        'model input side; images are resized (default: 32; 16 for Fashion-MNIST)'))
    in_chans: Optional[int] = field(default=None, metadata=field_help(
        "model input channels (default: the data's; 3 replicates grayscale)"))
    k: Optional[int] = field(default=None, metadata=field_help('clusters (default: the number of classes)'))
    targets: str = field(default='pseudo', metadata=field_help(
        "L_ViT targets: 'pseudo' = current cluster ids, unsupervised; 'true' = ground-truth labels (the paper)",
        choices=TARGETS))
    gamma: float = field(default=0.01, metadata=field_help('weight of L_clustering, eq. 8'))
    eps: float = field(default=1e-3, metadata=field_help('stop when l_current - l_new < eps'))
    rounds: Optional[str] = field(default=None, metadata=field_help(
        "what a round trains on: 'views' = eq. 8 on two contrastive views of every image beside NT-Xent, "
        "re-clustered by the UMAP readout; 'paper' = eq. 8 on lightly augmented images, re-clustered by k-means of "
        "the embedding, as the paper (default: 'views'; 'paper' for digits and with true targets)", choices=ROUNDS))
    max_rounds: Optional[int] = field(default=None, metadata=field_help(
        'retraining rounds after round 0 (default: 5; 3 for Fashion-MNIST)'))
    epochs: Optional[int] = field(default=None, metadata=field_help(
        'training epochs per round, round 0 included (default: 4; 2 for Fashion-MNIST)'))
    augment: bool = field(default=True, metadata=field_help('random rescale/shift augmentation of training images'))
    batch_size: int = field(default=64, metadata=field_help('global batch, split evenly over the processes'))
    lr: Optional[float] = field(default=None, metadata=field_help(
        "AdamW learning rate of the rounds (default: 1e-3, the peak of each round's one-cycle schedule, for 'views' "
        "rounds; 5e-4, constant, for 'paper' rounds)"))
    weight_decay: float = field(default=0.05, metadata=field_help('AdamW weight decay'))
    kmeans_restarts: int = field(default=4, metadata=field_help('k-means++ restarts'))
    match_ids: bool = field(default=True, metadata=field_help(
        "re-number each round's clusters to overlap the previous round's ids (stable pseudo-labels)"))
    pretrain: Optional[str] = field(default=None, metadata=field_help(
        "representation stage before round 0: 'simclr' (NT-Xent on two augmented views) or 'none' (round 0's "
        "pseudo-labels are read out of the pixels) (default: 'simclr' with pseudo targets, 'none' with true ones "
        "and for digits, whose 8x8 glyphs are too small to crop)", choices=PRETRAIN_METHODS))
    readout: str = field(default='umap', metadata=field_help(
        "how round 0's pseudo-labels are read out: 'umap' = k-means of a UMAP layout of the pixels and the "
        "contrastive embedding side by side (of the pixels without the stage), 'kmeans' = k-means of the "
        "embedding (of the pixels without the stage)", choices=READOUTS))
    pretrain_epochs: int = field(default=20, metadata=field_help('contrastive epochs'))
    pretrain_batch_size: int = field(default=256, metadata=field_help(
        "contrastive global batch, of the stage and the 'views' rounds; NT-Xent's negatives are the other 2B - 2 "
        "views of the batch"))
    pretrain_lr: float = field(default=2e-3, metadata=field_help(
        'peak AdamW learning rate of the contrastive stage (one-cycle cosine schedule)'))
    temperature: float = field(default=0.5, metadata=field_help("NT-Xent temperature (SimCLR's for small images)"))
    # None: chosen by `for_dataset`; off if nothing chooses
    hflip: Optional[bool] = field(default=None, metadata=field_help(
        'mirror the contrastive views: right for clothes and photos, wrong for digits (default: on, except for '
        'digits)'))
    view_scale: Tuple[float, float] = field(default=VIEW_CROP_AREA, metadata=field_help(
        "crop-area fraction range of the contrastive views, as timm's --scale", metavar=('MIN', 'MAX')))
    color_jitter: float = field(default=VIEW_JITTER, metadata=field_help(
        'brightness/contrast strength of the contrastive views: factors in 1 ± this'))
    seed: int = field(default=0, metadata=field_help('random seed of the whole run'))
    device: str = field(default='auto', metadata=field_help(DEVICE_HELP))


def dataset_family(name: str) -> Optional[str]:
    """The DATASET_DEFAULTS key of a dataset option or an ImageSet's name (splits and subsets included), if any."""
    for family in DATASET_DEFAULTS:
        if name == family or name.startswith((family + ':', family + '-', family + '[')):
            return family
    return None


def for_dataset(cfg: ClusterConfig, dataset: str) -> ClusterConfig:
    """cfg with the options it leaves to the dataset (None) chosen for it: DATASET_DEFAULTS, then GENERAL_DEFAULTS.

    `run_deep_clustering` applies it to the images it is given, so a library caller's None options get
    the command line's values; options already chosen stay. Other models than the default get no
    model_kwargs, and true targets the paper's rounds.
    """
    chosen = dict(GENERAL_DEFAULTS, **DATASET_DEFAULTS.get(dataset_family(dataset), {}))
    if cfg.model != DEFAULT_MODEL:
        chosen['model_kwargs'] = {}
    chosen.setdefault('rounds', 'views' if cfg.targets == 'pseudo' else 'paper')
    cfg = replace(cfg, **{name: copy.deepcopy(value) for name, value in chosen.items() if getattr(cfg, name) is None})
    return cfg if cfg.lr is not None else replace(cfg, lr=ROUND_LR.get(cfg.rounds))


@dataclass
class ClusterData:
    """Which images a run clusters; `cluster`'s data options are its fields."""
    dataset: str = field(default='digits', metadata=field_help(
        "'digits', 'fashion-mnist', 'fashion-mnist:train', 'fashion-mnist:test', or 'folder'"))
    data_dir: Optional[str] = field(default=None, metadata=field_help(
        f"Fashion-MNIST's idx folder (default: {FASHION_MNIST_DIR}), or the ImageFolder root of dataset 'folder'"))
    subset: Optional[int] = field(default=None, metadata=field_help('use a seeded random subset of this many images'))

    def load(self, cfg: ClusterConfig) -> ImageSet:
        """The images (`data.load_dataset` at cfg.img_size), or `subset` of them drawn with cfg.seed."""
        data = load_dataset(self.dataset, self.data_dir, cfg.img_size)
        return data.subset(self.subset, cfg.seed) if self.subset else data


def data_and_config_from(options: Mapping[str, Any]) -> Tuple[ImageSet, ClusterConfig]:
    """The images and settings that options named after ClusterData's and ClusterConfig's fields describe.

    What `cluster` and the clustering benchmarks run: the options left None are chosen for the dataset
    (`for_dataset`).
    """
    source = config_from_options(ClusterData, options)
    cfg = for_dataset(config_from_options(ClusterConfig, options), source.dataset)
    return source.load(cfg), cfg


class EmbedNet(nn.Module):
    """A timm model whose forward returns (pre-logits embedding z, logits), so DDP sees one forward for both."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        z = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return z, self.model.get_classifier()(z)


def pretrain_method(cfg: ClusterConfig) -> str:
    """The representation stage a run uses: the configured one, or SimCLR exactly when no labels are used."""
    if cfg.pretrain is not None:
        return cfg.pretrain
    return 'simclr' if cfg.targets == 'pseudo' else 'none'


def describe_readout(readout: str, pretrain: str) -> str:
    """What round 0's pseudo-labels are, in words, for the CLI's preamble and the benchmarks' settings lines."""
    features = 'the pixels' if pretrain == 'none' else 'the pixels and the contrastive embedding side by side'
    if readout == 'umap':
        return f'k-means of a UMAP layout of {features}'
    return 'k-means of ' + ('the pixels' if pretrain == 'none' else 'the contrastive embedding')


def describe_rounds(rounds: str, readout: str) -> str:
    """What a round trains on and how it re-clusters, in words, for the CLI's preamble."""
    if rounds == 'paper':
        return 'eq. 8 on lightly augmented images, re-clustered by k-means of the embedding'
    again = 'the UMAP readout' if readout == 'umap' else 'k-means of the embedding'
    return f'eq. 8 on two contrastive views beside NT-Xent, re-clustered by {again}'


def create_cluster_model(cfg: ClusterConfig, num_classes: int, in_chans: int) -> nn.Module:
    """timm.create_model with the run's size and channels; img_size is dropped for models without it (CNNs).

    Options left None get the general defaults (`for_dataset`), as no data chooses them here.
    """
    cfg = for_dataset(cfg, '')
    return create_model_at_size(cfg.model, cfg.img_size, num_classes=num_classes, in_chans=in_chans,
                                **cfg.model_kwargs)


def create_embed_net(cfg: ClusterConfig, num_classes: int, in_chans: int, device: torch.device) -> EmbedNet:
    """The run's model as an EmbedNet on device, its initial weights drawn from cfg.seed's own stream."""
    with seeded_global_rngs(derive_seed(cfg.seed, SeedPurpose.WEIGHTS), device):
        return EmbedNet(create_cluster_model(cfg, num_classes, in_chans).to(device))


@torch.no_grad()
def embed(net: nn.Module, images: torch.Tensor, cfg: ClusterConfig, in_chans: int, device: torch.device,
          rank: int = 0, world: int = 1, desc: str = 'embed') -> torch.Tensor:
    """Pre-logits embeddings of all images in dataset order; each rank embeds a shard, then all_gather."""
    net.eval()
    n = images.shape[0]
    start, stop = shard_range(n, rank, world)
    feats = []
    for i in progress(range(start, stop, 2 * cfg.batch_size), desc, enabled=rank == 0):
        x = prepare_batch(images[i:min(i + 2 * cfg.batch_size, stop)], cfg.img_size, in_chans, device)
        feats.append(net(x)[0].float())
    z = torch.cat(feats) if feats else torch.empty(0, device=device)
    if world == 1:
        return z
    # all_gather needs equal shapes: pad each shard to rank 0's, the largest, then trim the tail after concatenation
    width = z.shape[1] if z.numel() else _embed_dim(net, cfg, in_chans, device)
    padded = torch.zeros(shard_range(n, 0, world)[1], width, device=device)
    padded[:z.shape[0]] = z
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat(out)[:n]


@torch.no_grad()
def _embed_dim(net: nn.Module, cfg: ClusterConfig, in_chans: int, device: torch.device) -> int:
    """Embedding width from one image (projection head size; a rank whose shard is empty), probed in eval mode.

    In training mode a CNN whose last map is 1×1 at this size (resnet at 16²) has one value per channel
    for its BatchNorm and raises.
    """
    training = net.training
    net.eval()
    try:
        return net(torch.zeros(1, in_chans, cfg.img_size, cfg.img_size, device=device))[0].shape[1]
    finally:
        net.train(training)


def train_round(net: nn.Module, optimizer: torch.optim.Optimizer, images: torch.Tensor, targets: torch.Tensor,
                centroids: Optional[torch.Tensor], assignments: Optional[torch.Tensor], cfg: ClusterConfig,
                in_chans: int, device: torch.device, seed: int, rank: int = 0, world: int = 1,
                desc: str = 'train') -> Dict[str, float]:
    """Train cfg.epochs epochs on eq. 8 (γ term only when centroids are given); returns the last epoch's mean losses.

    Batch order and augmentation come from a generator seeded per round and drawn for the global
    batch, each rank taking its slice: the run is reproducible on resume and a DDP run sees the
    samples and augmentations of a one-process run.
    """
    net.train()
    n = images.shape[0]
    gen = torch.Generator().manual_seed(seed)
    local = cfg.batch_size // world
    use_clust = centroids is not None and cfg.gamma > 0
    live = on_terminal()
    # indices and per-image tensors live where the images do: a step then copies nothing from the host
    targets = targets.to(images.device)
    if use_clust:
        assignments = assignments.to(images.device)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n, generator=gen).to(images.device)
        aug = None
        if cfg.augment:
            scale = torch.empty(n).uniform_(*AUG_SCALE, generator=gen)
            shift = torch.empty(n, 2).uniform_(-AUG_SHIFT, AUG_SHIFT, generator=gen)
            aug = torch.cat([scale[:, None], shift], 1).to(images.device)
        # drop the ragged last batch so every rank gets an equal, non-empty slice
        steps = max(n // cfg.batch_size, 1)
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        bar = progress(range(steps), f'{desc} ep {epoch + 1}/{cfg.epochs}', enabled=rank == 0)
        for step in bar:
            idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size][rank * local:(rank + 1) * local]
            x = prepare_batch(images[idx], cfg.img_size, in_chans, device, None if aug is None else aug[idx])
            z, logits = net(x)
            loss_vit = F.cross_entropy(logits.float(), targets[idx].to(device))
            loss = loss_vit
            loss_clust = torch.zeros((), device=device)
            if use_clust:
                # eq. 7: squared distance of each embedding to the centroid of its current cluster
                mu = centroids[assignments[idx].to(device)]
                loss_clust = (z.float() - mu).pow(2).sum(1).mean()
                loss = loss + cfg.gamma * loss_clust
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach(), loss_vit.detach(), loss_clust.detach()]).double()
            # .item() waits for the GPU: every 10 steps on a terminal, once per epoch in a log
            if rank == 0 and (step == steps - 1 or (live and step % 10 == 0)):
                bar.set_postfix(loss=f'{loss.item():.3f}')
        if world > 1:
            dist.all_reduce(sums)
        means = (sums / (steps * world)).tolist()
        check_finite(means[0], f'training loss in epoch {epoch + 1} of {desc}',
                     f'lower --lr (now {cfg.lr}) or --gamma (now {cfg.gamma})')
    return {'loss': means[0], 'loss_vit': means[1], 'loss_clustering': means[2]}


def check_run(data: ImageSet, cfg: ClusterConfig, world: int = 1) -> int:
    """Check the data and options of a run on `world` processes before any work; returns k."""
    n = len(data)
    if n == 0:
        raise ValueError(f'dataset {data.name!r} is empty')
    k = cfg.k if cfg.k is not None else data.num_classes
    if cfg.k is None and data.labels is None:
        raise ValueError('the dataset has no labels, so k cannot default to the number of classes: pass k')
    if k < 2:
        raise ValueError(f'k must be at least 2, got k={k}')
    if k > n:
        raise ValueError(f'k={k} clusters requested but dataset {data.name!r} holds only {n} images')
    if cfg.targets not in TARGETS:
        raise ValueError(f'targets must be one of {TARGETS}, got {cfg.targets!r}')
    if cfg.targets == 'true':
        if data.labels is None:
            raise ValueError("targets='true' needs ground-truth labels; this dataset has none (use targets='pseudo')")
        if data.num_classes < k:
            raise ValueError(f"targets='true' trains on the ground-truth classes, but dataset {data.name!r} has "
                             f'{data.num_classes} classes, fewer than k={k}; lower k or use targets=\'pseudo\'')
    if cfg.batch_size < world or cfg.batch_size % world:
        raise ValueError(f'batch_size={cfg.batch_size} must be a positive multiple of the {world} processes')
    if cfg.pretrain not in (None,) + PRETRAIN_METHODS:
        raise ValueError(f'pretrain must be one of {PRETRAIN_METHODS}, got {cfg.pretrain!r}')
    if cfg.readout not in READOUTS:
        raise ValueError(f'readout must be one of {READOUTS}, got {cfg.readout!r}')
    if cfg.rounds not in ROUNDS:
        raise ValueError(f'rounds must be one of {ROUNDS}, got {cfg.rounds!r}')
    if cfg.rounds == 'views' and cfg.pretrain_batch_size < 2 * world:
        raise ValueError(f"'views' rounds train on NT-Xent: pretrain_batch_size must be >= 2 per process, got "
                         f'{cfg.pretrain_batch_size}')
    low, high = cfg.view_scale
    if not 0 < low <= high <= 1:
        raise ValueError(f'view_scale must satisfy 0 < min <= max <= 1 (fractions of the image area), '
                         f'got {cfg.view_scale}')
    if not 0 <= cfg.color_jitter < 1:
        raise ValueError(f'color_jitter must be in [0, 1) (factors 1 ± color_jitter stay positive), '
                         f'got {cfg.color_jitter}')
    if pretrain_method(cfg) != 'none' and (cfg.pretrain_epochs < 1 or cfg.pretrain_batch_size < 2 * world):
        raise ValueError(f'pretrain_epochs must be >= 1 and pretrain_batch_size >= 2 per process, got '
                         f'{cfg.pretrain_epochs} and {cfg.pretrain_batch_size}')
    if cfg.epochs < 1 or cfg.max_rounds < 0:
        raise ValueError(f'epochs must be >= 1 and max_rounds >= 0, got {cfg.epochs} and {cfg.max_rounds}')
    return k


def _evaluate(labels: Optional[np.ndarray], pred: np.ndarray) -> Dict[str, float]:
    """NMI/ARI/ACC against ground truth when there is one."""
    return {} if labels is None else cluster_metrics(labels, pred)


def run_deep_clustering(data: ImageSet, cfg: ClusterConfig, out_dir: str, resume: bool = False,
                        on_round_end: Optional[Callable[[int, Dict[str, Any]], None]] = None,
                        log: Callable[[str], None] = log_line, env: Optional[DistributedEnv] = None) -> Dict[str, Any]:
    """The paper's loop (Fig. 3) with baselines, per-round metrics, checkpoints and output files; returns metrics.json's dict.

    In pseudo mode with `pretrain='simclr'` (the default there), the model first learns from augmented
    views (NT-Xent); the initial clusters are then k-means on a UMAP layout of the pixels and that
    embedding (`readout='umap'`, the default) or on the embedding (`'kmeans'`). Without the stage
    they are read out of the pixels alone the same way. Round 0 trains L_ViT on those initial clusters
    (pseudo mode), embeds and clusters. Each later round retrains with eq. 8 against the previous round's
    centroids, re-embeds and re-clusters. 'views' rounds (the default with pseudo targets) train on two
    contrastive views beside NT-Xent and re-cluster with the run's readout (UMAP: of the pixels beside the
    new embedding); 'paper' rounds train on lightly augmented images and re-cluster by k-means of the
    embedding. The loop stops once l_current - l_new < eps or after max_rounds; the last round's clustering
    is the result. Options left None are chosen for the data (`for_dataset`).
    on_round_end(round, record) runs after each round's checkpoint is written (tests use it to stop a run).
    env: the processes to run on (default: the process group already joined, else this process on cfg.device).
    """
    cfg = for_dataset(cfg, data.name)
    run = _setup(data, cfg, out_dir, log, env or DistributedEnv.current(cfg.device))
    state = _resume(run) if resume else None
    if state is None:
        state = _initial_state(run)
    z = None  # the latest embeddings; the loop leaves the final model's here
    while state['stop_reason'] is None:
        r = len(state['history'])
        t0 = time.perf_counter()
        prev = state['assignments'] if r > 0 else state['initial_assignments']
        losses = _train(run, state, prev)
        z = run.embed(f'embed round {r}')
        reread = cfg.rounds == 'views' and cfg.readout == 'umap'
        assign, centroids, inertia = (_reread if reread else _recluster)(run, z, prev, stage=r + 1)
        record = {'round': r, **losses, 'inertia': inertia, **_evaluate(data.labels, assign.numpy()),
                  'nmi_vs_previous': nmi(prev, assign), 'time_s': time.perf_counter() - t0}
        state['history'].append(record)
        state['assignments'], state['centroids'] = assign, centroids.cpu()
        state['elapsed_s'] += record['time_s']
        state['stop_reason'] = _stop_reason(cfg, state['history'])
        _end_round(run, state)
        if on_round_end is not None:
            on_round_end(r, record)
    _finish(run, state, z)
    return _metrics_dict(run, state)


@dataclass
class _Run:
    """What every step of one run shares, so each takes one argument instead of ten."""
    data: ImageSet
    cfg: ClusterConfig
    k: int
    in_chans: int
    env: DistributedEnv
    out: Path
    net: EmbedNet
    images: torch.Tensor  # data.images, moved to the device once when they fit (`_resident`)
    train_net: nn.Module  # net, or its DDP wrapper: what the paper's rounds train; net embeds and is checkpointed
    projection: Optional[nn.Module]  # NT-Xent's head, of the stage and the views rounds
    views_net: Optional[nn.Module]  # net's model with that head (DDP-wrapped): what the views rounds train
    optimizer: torch.optim.Optimizer
    config: Dict[str, Any]  # cfg as checkpointed, with its defaults resolved
    log: Callable[[str], None]
    pixels: Optional[torch.Tensor] = None  # the readout's pixel features, once computed

    @property
    def checkpoint_path(self) -> Path:
        return self.out / CHECKPOINT_NAME

    def embed(self, desc: str) -> torch.Tensor:
        """Embeddings of every image under the current model."""
        return embed(self.net, self.images, self.cfg, self.in_chans, self.env.device, self.env.rank, self.env.world,
                     desc=desc)

    def kmeans(self, x: torch.Tensor, stage: int) -> KMeansResult:
        """k-means into the run's k clusters with its number of restarts; stage 0 before the loop, r + 1 in round r."""
        return kmeans(x, self.k, n_init=self.cfg.kmeans_restarts, seed=self.clustering_seed(stage))

    def pixel_features(self) -> torch.Tensor:
        """The pixel block of the baselines and the readout (`features.pixel_features`), computed once."""
        if self.pixels is None:
            self.pixels = pixel_features(self.images, self.env.device, seed=self.clustering_seed(0))
        return self.pixels

    def clustering_seed(self, stage: int) -> int:
        """The seed of the k-means restarts (and UMAP layout) of one stage."""
        return derive_seed(self.cfg.seed, SeedPurpose.CLUSTERING, stage)

    def save(self, state: Dict[str, Any]) -> None:
        """The checkpoint a resume continues from: weights, optimizer, loop state, config."""
        projection = None if self.projection is None else self.projection.state_dict()
        save_atomic({'model': self.net.state_dict(), 'projection': projection, 'optimizer': self.optimizer.state_dict(),
                     'state': state, 'config': self.config, 'n': len(self.data)}, self.checkpoint_path)


def _setup(data: ImageSet, cfg: ClusterConfig, out_dir: str, log: Callable[[str], None], env: DistributedEnv) -> _Run:
    """Checked options, output folder, and the model, seeded, with its optimizer."""
    k = check_run(data, cfg, env.world)
    in_chans = cfg.in_chans or data.images.shape[1]
    out = Path(out_dir)
    if env.is_primary:
        out.mkdir(parents=True, exist_ok=True)
    num_out = k if cfg.targets == 'pseudo' else int(data.labels.max()) + 1
    net = create_embed_net(cfg, num_out, in_chans, env.device)
    projection = views_net = None
    if pretrain_method(cfg) == 'simclr' or cfg.rounds == 'views':
        projection = create_projection(net, cfg, in_chans, env.device)
    if cfg.rounds == 'views':
        # the head takes no part in L_ViT's logits nor the classifier in NT-Xent's: DDP must allow unused parameters
        views_net = env.data_parallel(ContrastiveNet(net.model, projection), find_unused_parameters=True)
    trained = list(net.parameters()) + (list(projection.parameters()) if views_net is not None else [])
    return _Run(data, cfg, k, in_chans, env, out, net, _resident(data.images, env.device),
                train_net=env.data_parallel(net), projection=projection, views_net=views_net,
                optimizer=torch.optim.AdamW(trained, lr=cfg.lr, weight_decay=cfg.weight_decay),
                config=dict(asdict(cfg), k=k, pretrain=pretrain_method(cfg)), log=log)


def create_projection(net: EmbedNet, cfg: ClusterConfig, in_chans: int, device: torch.device) -> nn.Module:
    """NT-Xent's projection head for net's embedding, on device, its weights drawn from cfg.seed's own stream."""
    with seeded_global_rngs(derive_seed(cfg.seed, SeedPurpose.WEIGHTS, index=1), device):
        return projection_head(_embed_dim(net, cfg, in_chans, device)).to(device)


def _resident(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The uint8 images on the GPU when they take ≤ 1/4 of its free memory (Fashion-MNIST: 55 MB), else as they are.

    Every training and embedding step then slices them on the device: no per-step host-to-device copy
    from pageable memory, which would make each step wait for the host.
    """
    if device.type != 'cuda' or images.numel() * images.element_size() > torch.cuda.mem_get_info(device)[0] // 4:
        return images
    return images.to(device)


def _resume(run: _Run) -> Optional[Dict[str, Any]]:
    """The loop state of a killed run, restored with its weights and RNGs; None when there is no checkpoint."""
    path = run.checkpoint_path
    if not path.is_file():
        if run.env.is_primary:
            run.log(f'no checkpoint at {path}: starting from scratch')
        return None
    ckpt = load_for_resume(path, run.env.device, CHECKPOINT_KEYS, written_by='cluster')
    check_same_run(dict(ckpt['config'], images=ckpt['n']),
                   dict({key: run.config[key] for key in RESUME_KEYS}, images=len(run.data)), path, _BEFORE_OPTION)
    run.net.load_state_dict(ckpt['model'])
    if run.projection is not None and ckpt.get('projection') is not None:
        run.projection.load_state_dict(ckpt['projection'])
    run.optimizer.load_state_dict(ckpt['optimizer'])
    state = ckpt['state']
    run.log(f'resumed from {path} after ' + (f'round {state["history"][-1]["round"]}' if state['history']
                                             else 'the representation stage'))
    return state


def _initial_state(run: _Run) -> Dict[str, Any]:
    """Before round 0: the k-means baselines, the optional representation stage, and round 0's targets."""
    t0 = time.perf_counter()
    state = _baselines(run)
    z = _representation_stage(run, state) if pretrain_method(run.cfg) == 'simclr' else None
    if run.cfg.targets == 'pseudo' and run.cfg.readout == 'umap':
        _umap_readout(run, state, z)
    state['elapsed_s'] = time.perf_counter() - t0
    if run.env.is_primary:
        for name, m in state['baselines'].items():
            run.log(f'baseline {name:38s} ' + ' '.join(f'{key.upper()} {m[key]:.4f}' for key in ('nmi', 'ari', 'acc')
                                                       if key in m))
        if state['pretrain'] is not None:
            run.log(f'contrastive stage: {state["pretrain"]["time_s"]:.1f} s, '
                    f'NT-Xent {state["pretrain"]["loss_contrastive"]:.4f}')
            # a resume after this point starts at round 0 instead of repeating the stage
            run.save(state)
    run.env.barrier()
    return state


def _baselines(run: _Run) -> Dict[str, Any]:
    """A fresh loop state with the k-means baselines: pixels (round 0's targets with neither stage nor UMAP) and
    the untrained embedding."""
    pix = run.kmeans(run.pixel_features(), stage=0)
    untrained = run.kmeans(run.embed('embed untrained'), stage=0)
    return {
        'baselines': {
            'kmeans_pixels': _evaluate(run.data.labels, pix.labels.cpu().numpy()),
            'kmeans_untrained_embedding': _evaluate(run.data.labels, untrained.labels.cpu().numpy()),
        },
        'initial_assignments': pix.labels.cpu(), 'pretrain': None,
        'assignments': None, 'centroids': None, 'history': [], 'stop_reason': None,
    }


def umap_readout(pixels: torch.Tensor, z: Optional[torch.Tensor], k: int, n_init: int, seed: int) -> torch.Tensor:
    """Cluster ids of k-means on a UMAP layout of the pixel features, beside the embedding z when given.

    One definition for the loop and for benchmarks/bench_views.py, so its column measures what round 0 trains on.
    """
    features = joint_features(pixels) if z is None else joint_features(pixels, z)
    return kmeans(umap_layout(features, seed=seed), k, n_init=n_init, seed=seed).labels


def _representation_stage(run: _Run, state: Dict[str, Any]) -> torch.Tensor:
    """The representation stage before the paper's loop (SimCLR); returns its embedding, whose k-means is round 0's
    targets unless the UMAP readout replaces them."""
    state['pretrain'] = pretrain_representation(run.net, run.images, run.cfg, run.in_chans, run.env.device,
                                                run.env.rank, run.env.world, projection=run.projection)
    z = run.embed('embed contrastive')
    check_embeddings(z, run.k)
    km = run.kmeans(z, stage=0)
    state['initial_assignments'] = km.labels.cpu()
    state['baselines']['kmeans_contrastive_embedding'] = dict(_evaluate(run.data.labels, km.labels.cpu().numpy()),
                                                              time_s=state['pretrain']['time_s'])
    return z


def _umap_readout(run: _Run, state: Dict[str, Any], z: Optional[torch.Tensor]) -> None:
    """Round 0's targets: k-means on a UMAP layout of the pixels, beside the contrastive embedding z when there is one.

    The pixels' neighbourhoods are the more label-faithful and the embedding's global shape the better
    for k-means; side by side they beat both (docs/clustering.md).
    """
    t0 = time.perf_counter()
    labels = _readout_labels(run, z, stage=0)
    state['initial_assignments'] = labels
    name = 'umap_pixels' if z is None else 'umap_contrastive_embedding_and_pixels'
    state['baselines'][name] = dict(_evaluate(run.data.labels, labels.cpu().numpy()), time_s=time.perf_counter() - t0)


def _readout_labels(run: _Run, z: Optional[torch.Tensor], stage: int) -> torch.Tensor:
    """`umap_readout` of the run's pixels beside z, on the CPU; rank 0 computes it and broadcasts.

    On a GPU the layout's index_add_ is not bitwise reproducible, and every rank must train on the same targets.
    """
    if run.env.is_primary:
        labels = umap_readout(run.pixel_features(), z, run.k, run.cfg.kmeans_restarts, run.clustering_seed(stage))
        labels = labels.to(run.env.device)
    else:
        labels = torch.empty(len(run.data), dtype=torch.long, device=run.env.device)
    if run.env.world > 1:
        dist.broadcast(labels, 0)
    return labels.cpu()


def pretrain_representation(net: EmbedNet, images: torch.Tensor, cfg: ClusterConfig, in_chans: int,
                            device: torch.device, rank: int = 0, world: int = 1,
                            projection: Optional[nn.Module] = None) -> Dict[str, float]:
    """The contrastive stage: NT-Xent through a projection head on net's embedding, with its own AdamW.

    The head (a new one when none is given) carries over to the views rounds; the stage's optimizer does
    not. DDP needs find_unused_parameters because the classifier head takes no part in this loss.
    """
    t0 = time.perf_counter()
    env = DistributedEnv(device, rank, world)
    if projection is None:
        projection = create_projection(net, cfg, in_chans, device)
    contrastive = ContrastiveNet(net.model, projection)
    train_net = env.data_parallel(contrastive, find_unused_parameters=True)
    optimizer = torch.optim.AdamW(contrastive.parameters(), lr=cfg.pretrain_lr, weight_decay=cfg.weight_decay)
    with seeded_global_rngs(derive_seed(cfg.seed, SeedPurpose.CONTRASTIVE_STEPS, index=rank), device):
        losses = train_on_views(train_net, optimizer, images, cfg.pretrain_epochs, cfg.pretrain_batch_size,
                                cfg.pretrain_lr, cfg.temperature, bool(cfg.hflip), cfg.img_size, in_chans, device,
                                seed=derive_seed(cfg.seed, SeedPurpose.CONTRASTIVE), rank=rank, world=world,
                                view_scale=tuple(cfg.view_scale), color_jitter=cfg.color_jitter)
    return {'method': 'simclr', 'loss_contrastive': losses['loss_contrastive'], 'time_s': time.perf_counter() - t0}


def _train(run: _Run, state: Dict[str, Any], prev: torch.Tensor) -> Dict[str, float]:
    """One round's training: cross-entropy on the targets in round 0, eq. 8 against the last centroids after.

    'views' rounds train it on two contrastive views of every image beside NT-Xent, 'paper' rounds on the
    lightly augmented images.
    """
    r = len(state['history'])
    cfg = run.cfg
    targets = prev if cfg.targets == 'pseudo' else torch.from_numpy(run.data.labels)
    centroids = state['centroids'].to(run.env.device) if r > 0 else None
    env = run.env
    # dropout and drop path, when the model has them, draw per rank from a stream a resumed round repeats
    with seeded_global_rngs(derive_seed(cfg.seed, SeedPurpose.STEPS, r, env.rank), env.device):
        if cfg.rounds == 'views':
            return train_on_views(run.views_net, run.optimizer, run.images, cfg.epochs, cfg.pretrain_batch_size,
                                  cfg.lr, cfg.temperature, bool(cfg.hflip), cfg.img_size, run.in_chans, env.device,
                                  seed=derive_seed(cfg.seed, SeedPurpose.ORDER, r), rank=env.rank, world=env.world,
                                  view_scale=tuple(cfg.view_scale), color_jitter=cfg.color_jitter, targets=targets,
                                  assignments=state['assignments'], centroids=centroids, gamma=cfg.gamma,
                                  desc=f'round {r}')
        return train_round(run.train_net, run.optimizer, run.images, targets, centroids, state['assignments'], cfg,
                           run.in_chans, env.device, seed=derive_seed(cfg.seed, SeedPurpose.ORDER, r), rank=env.rank,
                           world=env.world, desc=f'round {r}')


def _recluster(run: _Run, z: torch.Tensor, prev: torch.Tensor, stage: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """k-means on the new embeddings: (assignments, centroids, inertia), ids matched to prev if cfg.match_ids."""
    check_embeddings(z, run.k)
    km = run.kmeans(z, stage)
    assign, centroids = km.labels.cpu(), km.centroids
    if run.cfg.match_ids:
        # k-means numbers clusters arbitrarily; keep each cluster's id where its members were, so the
        # pseudo-label head and eq. 7's centroids refer to the same groups from round to round
        perm = torch.from_numpy(match_clusters(assign, prev, run.k))
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(run.k)
        assign, centroids = perm[assign], centroids[inv.to(centroids.device)]
    return assign, centroids, km.inertia


def _reread(run: _Run, z: torch.Tensor, prev: torch.Tensor, stage: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """The views rounds' re-clustering: the UMAP readout of the pixels beside the new embeddings; (assignments,
    centroids, inertia) as `_recluster` gives them, the centroids being each cluster's mean embedding (eq. 7's μ)."""
    check_embeddings(z, run.k)
    assign = _readout_labels(run, z, stage)
    if run.cfg.match_ids:
        assign = torch.from_numpy(match_clusters(assign, prev, run.k))[assign]
    z = z.float().cpu()
    counts = torch.bincount(assign, minlength=run.k).clamp(min=1)
    centroids = torch.zeros(run.k, z.shape[1]).index_add_(0, assign, z) / counts[:, None]
    return assign, centroids, (z - centroids[assign]).pow(2).sum().item()


def _stop_reason(cfg: ClusterConfig, history: List[Dict[str, Any]]) -> Optional[str]:
    """The paper's stopping rule l_current - l_new < ε, or max_rounds; None to go on.

    The loss difference counts from round 2, the first round whose predecessor also trained on eq. 8.
    """
    r = len(history) - 1
    if r >= 2 and history[r - 1]['loss'] - history[r]['loss'] < cfg.eps:
        return f'l_current - l_new = {history[r - 1]["loss"] - history[r]["loss"]:.4g} < eps = {cfg.eps}'
    if r >= cfg.max_rounds:
        return f'max_rounds = {cfg.max_rounds} reached'
    return None


def _end_round(run: _Run, state: Dict[str, Any]) -> None:
    """Rank 0 logs the round and writes its checkpoint, metrics.json and NMI curve; every rank waits for them."""
    record = state['history'][-1]
    if run.env.is_primary:
        run.log(f'round {record["round"]}: loss {record["loss"]:.4f} (L_ViT {record["loss_vit"]:.4f}, '
                f'L_clust {record["loss_clustering"]:.3f})' + ''.join(
                    f' {key.upper()} {record[key]:.4f}' for key in ('nmi', 'ari', 'acc') if key in record)
                + f' | {record["time_s"]:.1f} s' + (f' | stop: {state["stop_reason"]}' if state['stop_reason'] else ''))
        run.save(state)
        _write_metrics(run, state)
        plot_nmi_curve(state['history'], state['baselines'], run.out / 'nmi_per_round.png')
    run.env.barrier()  # no rank starts the next round (or a resume) before the checkpoint exists


def _finish(run: _Run, state: Dict[str, Any], z: Optional[torch.Tensor]) -> None:
    """The result files: assignments.csv and clusters.png of the final model's embeddings."""
    if z is None:  # resumed a finished run: nothing was trained, embed the final model for the figure
        z = run.embed('embed final')
    if run.env.is_primary:
        _write_assignments(run.out / 'assignments.csv', state['assignments'].numpy(), run.data.labels)
        plot_cluster_grid(run.data.images, state['assignments'], z.cpu(), state['centroids'], run.data.labels,
                          run.out / 'clusters.png')
        run.log(f'done: {state["stop_reason"]}; outputs in {run.out}')


def _metrics_dict(run: _Run, state: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON-able summary of a run: settings, baselines, per-round records, stop reason."""
    return {'dataset': run.data.name, 'n': len(run.data), 'k': run.k, 'world_size': run.env.world,
            'config': asdict(run.cfg), 'baselines': state['baselines'], 'pretrain': state['pretrain'],
            'rounds': state['history'], 'stop_reason': state['stop_reason'], 'elapsed_s': state['elapsed_s']}


def _write_metrics(run: _Run, state: Dict[str, Any]) -> None:
    """metrics.json, rewritten every round so a long run can be watched."""
    write_metrics(_metrics_dict(run, state), run.out / METRICS_NAME)


def _write_assignments(path: Path, assign: np.ndarray, labels: Optional[np.ndarray]) -> None:
    """index,cluster[,label] per image in dataset order."""
    rows: List[str] = ['index,cluster' + (',label' if labels is not None else '')]
    for i, c in enumerate(assign.tolist()):
        rows.append(f'{i},{c}' + (f',{labels[i]}' if labels is not None else ''))
    path.write_text('\n'.join(rows) + '\n')
