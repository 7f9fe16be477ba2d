"""`timm-supertoken cluster`: ViT deep clustering from the command line (one process or under torchrun)."""
import argparse
import os
import time
from typing import Any, Dict, Tuple

from ..clustering.deep_clustering import (PRETRAIN_METHODS, READOUTS, ClusterConfig, describe_readout,
                                          pretrain_method, run_deep_clustering)
from ..clustering.report import results_markdown
from ..data.image_sets import ImageSet, load_dataset
from .options import (
    add_command, add_data_dir, add_device, add_img_size, add_model_kwargs, add_out, add_resume, add_seed, add_threads,
    print_preamble)

__all__ = ['add_commands', 'add_cluster_arguments', 'cmd_cluster', 'data_and_config', 'DEFAULT_MODEL',
           'DEFAULT_MODEL_KWARGS']

# the embedded default must finish on 2 CPU cores in minutes: ViT-S width, 4 of its 12 blocks, 32×32 input
DEFAULT_MODEL = 'vit_small_stconv'
DEFAULT_MODEL_KWARGS: Dict[str, Any] = {'depth': 4}
_DEFAULTS = ClusterConfig()


def cmd_cluster(args: argparse.Namespace) -> int:
    """ViT deep clustering on digits, Fashion-MNIST or an image folder.

    The method of "Deep Clustering Based on Vision Transformer (ViT) for Images": trains, embeds, runs
    k-means, retrains with L = L_ViT + gamma * L_clustering, and repeats while the loss drops by at least eps.
    Defaults: scikit-learn digits on CPU in a few minutes.
    """
    rank = int(os.environ.get('RANK', '0'))
    start = time.perf_counter()
    data, cfg = data_and_config(args)
    if rank == 0:
        print_preamble(_settings(data, cfg))
    result = run_deep_clustering(data, cfg, args.out, resume=args.resume)
    if rank == 0:
        print('\n' + results_markdown(result))
        print(f'\ndone in {time.perf_counter() - start:.1f} s')
    return 0


def _settings(data: ImageSet, cfg: ClusterConfig) -> Tuple[str, ...]:
    """The data, model, representation stage and loop, one line each, for the preamble."""
    scaled_down = cfg.model_kwargs == DEFAULT_MODEL_KWARGS and cfg.model == DEFAULT_MODEL
    method = pretrain_method(cfg)
    stage = () if method == 'none' else (
        f'representation stage: {method}, {cfg.pretrain_epochs} epochs, batch {cfg.pretrain_batch_size}, '
        f'lr {cfg.pretrain_lr}, temperature {cfg.temperature}, hflip={cfg.hflip}, view scale '
        f'{cfg.view_scale[0]:g}-{cfg.view_scale[1]:g}, color jitter {cfg.color_jitter:g}',)
    return (
        f'data: {data.name}, {len(data)} images {tuple(data.images.shape[1:])}, {data.num_classes} classes',
        f'model: {cfg.model} {cfg.model_kwargs or ""} at {cfg.img_size}x{cfg.img_size}, '
        f'in_chans={cfg.in_chans or data.images.shape[1]}'
        + (' (scaled down from ViT-S depth 12 so the default run fits a CPU)' if scaled_down else ''),
        *stage,
        f'loop: targets={cfg.targets}'
        + (f' (round 0 trains on {describe_readout(cfg.readout, method)})' if cfg.targets == 'pseudo' else '')
        + f', gamma={cfg.gamma}, eps={cfg.eps}, max_rounds={cfg.max_rounds}, epochs/round={cfg.epochs}, '
        f'augment={cfg.augment}, batch={cfg.batch_size}, lr={cfg.lr}, seed={cfg.seed}',
    )


def data_and_config(args: argparse.Namespace) -> Tuple[ImageSet, ClusterConfig]:
    """The dataset and run settings the `cluster` options describe (shared with benchmarks/bench_cluster.py).

    Digits default to no representation stage: on its 8×8 glyphs, crops remove whole strokes, and 10
    SimCLR epochs clustered worse than the pixels (NMI 0.644 vs 0.743) while costing minutes on 2 cores.
    """
    model_kwargs = args.model_kwargs if args.model_kwargs is not None else (
        dict(DEFAULT_MODEL_KWARGS) if args.model == DEFAULT_MODEL else {})
    data = load_dataset(args.dataset, args.data_dir, args.img_size)
    if args.subset:
        data = data.subset(args.subset, args.seed)
    cfg = ClusterConfig(
        model=args.model, model_kwargs=model_kwargs, img_size=args.img_size, in_chans=args.in_chans, k=args.k,
        targets=args.targets, gamma=args.gamma, eps=args.eps, max_rounds=args.max_rounds, epochs=args.epochs,
        augment=args.augment, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        kmeans_restarts=args.kmeans_restarts, match_ids=args.match_ids, readout=args.readout,
        pretrain=args.pretrain if args.pretrain is not None or args.dataset != 'digits' else 'none',
        pretrain_epochs=args.pretrain_epochs, pretrain_batch_size=args.pretrain_batch_size, pretrain_lr=args.pretrain_lr,
        temperature=args.temperature, hflip=args.hflip if args.hflip is not None else args.dataset != 'digits',
        view_scale=tuple(args.view_scale), color_jitter=args.color_jitter,
        seed=args.seed, device=args.device)
    return data, cfg


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The `cluster` options, on any parser: benchmarks/bench_cluster.py takes them all with its own defaults."""
    p.add_argument('--dataset', default='digits',
                   help="'digits' (default), 'fashion-mnist', 'fashion-mnist:train', 'fashion-mnist:test', or 'folder'")
    add_data_dir(p, otherwise='the ImageFolder root')
    p.add_argument('--subset', type=int, default=None, help='use a seeded random subset of this many images')
    p.add_argument('--model', default=DEFAULT_MODEL, help=f'any timm model name (default {DEFAULT_MODEL})')
    add_model_kwargs(p, help=f'timm.create_model kwargs, e.g. depth=4 embed_dim=192 '
                             f'(default for {DEFAULT_MODEL}: {DEFAULT_MODEL_KWARGS}, otherwise none)')
    add_img_size(p, _DEFAULTS.img_size, help='model input side; images are resized (default 32)')
    p.add_argument('--in-chans', type=int, default=None,
                   help='model input channels (default: the data\'s; 3 replicates grayscale)')
    p.add_argument('--k', type=int, default=None, help='clusters (default: number of classes)')
    p.add_argument('--targets', choices=('pseudo', 'true'), default=_DEFAULTS.targets,
                   help="L_ViT targets: 'pseudo' = current cluster ids, unsupervised (default); 'true' = labels (paper)")
    p.add_argument('--gamma', type=float, default=_DEFAULTS.gamma, help='weight of L_clustering, eq. 8 (default 0.01)')
    p.add_argument('--eps', type=float, default=_DEFAULTS.eps, help='stop when l_current - l_new < eps (default 1e-3)')
    p.add_argument('--max-rounds', type=int, default=_DEFAULTS.max_rounds,
                   help='retraining rounds after round 0 (default 5)')
    p.add_argument('--epochs', type=int, default=_DEFAULTS.epochs, help='epochs per round (default 4)')
    p.add_argument('--no-aug', dest='augment', action='store_false', help='no random rescale/shift augmentation')
    p.add_argument('--pretrain', choices=PRETRAIN_METHODS, default=None,
                   help="representation stage before round 0: 'simclr' (NT-Xent on two augmented views; the default "
                        "with --targets pseudo) or 'none' (round 0's pseudo-labels are read out of the pixels; the "
                        "default with --targets true and for digits, whose 8x8 glyphs are too small to crop)")
    p.add_argument('--readout', choices=READOUTS, default=_DEFAULTS.readout,
                   help="how round 0's pseudo-labels are read out: 'umap' = k-means of a UMAP layout of the pixels "
                        "and the contrastive embedding side by side (of the pixels without the stage; default), "
                        "'kmeans' = k-means of the embedding (of the pixels without the stage)")
    p.add_argument('--pretrain-epochs', type=int, default=_DEFAULTS.pretrain_epochs,
                   help=f'contrastive epochs (default {_DEFAULTS.pretrain_epochs})')
    p.add_argument('--pretrain-batch-size', type=int, default=_DEFAULTS.pretrain_batch_size,
                   help=f'contrastive global batch; its other views are the negatives '
                        f'(default {_DEFAULTS.pretrain_batch_size})')
    p.add_argument('--pretrain-lr', type=float, default=_DEFAULTS.pretrain_lr,
                   help=f'peak AdamW learning rate of the contrastive stage (default {_DEFAULTS.pretrain_lr})')
    p.add_argument('--temperature', type=float, default=_DEFAULTS.temperature,
                   help=f'NT-Xent temperature (default {_DEFAULTS.temperature})')
    p.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=None,
                   help='mirror contrastive views (default: on, except for digits, where a mirrored glyph is another one)')
    p.add_argument('--view-scale', type=float, nargs=2, metavar=('MIN', 'MAX'), default=list(_DEFAULTS.view_scale),
                   help='crop-area fraction range of the contrastive views, as timm\'s --scale '
                        f'(default {_DEFAULTS.view_scale[0]:g} {_DEFAULTS.view_scale[1]:g})')
    p.add_argument('--color-jitter', type=float, default=_DEFAULTS.color_jitter,
                   help=f'brightness/contrast strength of the contrastive views: factors in 1 ± this '
                        f'(default {_DEFAULTS.color_jitter:g})')
    p.add_argument('--batch-size', type=int, default=_DEFAULTS.batch_size, help='global batch size (default 64)')
    p.add_argument('--lr', type=float, default=_DEFAULTS.lr, help='AdamW learning rate (default 5e-4)')
    p.add_argument('--weight-decay', type=float, default=_DEFAULTS.weight_decay,
                   help='AdamW weight decay (default 0.05)')
    p.add_argument('--kmeans-restarts', type=int, default=_DEFAULTS.kmeans_restarts,
                   help='k-means++ restarts (default 4)')
    p.add_argument('--no-match-ids', dest='match_ids', action='store_false',
                   help='do not re-number each round\'s clusters to match the previous round\'s')
    add_seed(p, _DEFAULTS.seed, help=f'random seed (default {_DEFAULTS.seed})')
    add_device(p)
    add_threads(p)
    add_out(p, './timm-supertoken-cluster', help='output folder (metrics, figures, checkpoint)')
    add_resume(p)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `cluster`."""
    add_cluster_arguments(add_command(subparsers, cmd_cluster))
