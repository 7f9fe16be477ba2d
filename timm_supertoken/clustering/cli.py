"""`timm-supertoken cluster`: ViT deep clustering from the command line (one process or under torchrun)."""
import argparse
import os
import time
from typing import Any, Dict, Tuple

import torch
from timm.utils import ParseKwargs

from ..runtime import hardware_info
from ..data import FASHION_MNIST_DIR, ImageSet, load_dataset
from .deep_clustering import PRETRAIN_METHODS, ClusterConfig, pretrain_method, run_deep_clustering
from .report import results_markdown

__all__ = ['add_cluster_command', 'cmd_cluster', 'data_and_config', 'DEFAULT_MODEL', 'DEFAULT_MODEL_KWARGS']

# the embedded default must finish on 2 CPU cores in minutes: ViT-S width, 4 of its 12 blocks, 32×32 input
DEFAULT_MODEL = 'vit_small_stconv'
DEFAULT_MODEL_KWARGS: Dict[str, Any] = {'depth': 4}
_DEFAULTS = ClusterConfig()


def add_cluster_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the `cluster` subcommand on the main parser's subparsers."""
    p = subparsers.add_parser(
        'cluster', help='"ViT-based deep clustering for images" on digits, Fashion-MNIST or an image folder',
        description='Train, embed, k-means, retrain with L = L_ViT + gamma * L_clustering; repeat while the loss '
                    'drops by at least eps. Defaults: scikit-learn digits on CPU in a few minutes.')
    p.add_argument('--dataset', default='digits',
                   help="'digits' (default), 'fashion-mnist', 'fashion-mnist:train', 'fashion-mnist:test', or 'folder'")
    p.add_argument('--data-dir', default=None,
                   help=f'Fashion-MNIST idx folder (default {FASHION_MNIST_DIR}) or the ImageFolder root')
    p.add_argument('--subset', type=int, default=None, help='use a seeded random subset of this many images')
    p.add_argument('--model', default=DEFAULT_MODEL, help=f'any timm model name (default {DEFAULT_MODEL})')
    p.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs,
                   help=f'timm.create_model kwargs, e.g. depth=4 embed_dim=192 '
                        f'(default for {DEFAULT_MODEL}: {DEFAULT_MODEL_KWARGS}, otherwise none)')
    p.add_argument('--img-size', type=int, default=_DEFAULTS.img_size, help='model input side; images are resized (default 32)')
    p.add_argument('--in-chans', type=int, default=None,
                   help='model input channels (default: the data\'s; 3 replicates grayscale)')
    p.add_argument('--k', type=int, default=None, help='clusters (default: number of classes)')
    p.add_argument('--targets', choices=('pseudo', 'true'), default=_DEFAULTS.targets,
                   help="L_ViT targets: 'pseudo' = current cluster ids, unsupervised (default); 'true' = labels (paper)")
    p.add_argument('--gamma', type=float, default=_DEFAULTS.gamma, help='weight of L_clustering, eq. 8 (default 0.01)')
    p.add_argument('--eps', type=float, default=_DEFAULTS.eps, help='stop when l_current - l_new < eps (default 1e-3)')
    p.add_argument('--max-rounds', type=int, default=_DEFAULTS.max_rounds, help='retraining rounds after round 0 (default 5)')
    p.add_argument('--epochs', type=int, default=_DEFAULTS.epochs, help='epochs per round (default 4)')
    p.add_argument('--no-aug', dest='augment', action='store_false', help='no random rescale/shift augmentation')
    p.add_argument('--pretrain', choices=PRETRAIN_METHODS, default=None,
                   help="representation stage before round 0: 'simclr' (NT-Xent on two augmented views; the default "
                        "with --targets pseudo) or 'none' (round 0 trains on k-means of the pixels; the default with "
                        "--targets true and for digits, whose 8x8 glyphs are too small to crop)")
    p.add_argument('--pretrain-epochs', type=int, default=_DEFAULTS.pretrain_epochs,
                   help=f'contrastive epochs (default {_DEFAULTS.pretrain_epochs})')
    p.add_argument('--pretrain-batch-size', type=int, default=_DEFAULTS.pretrain_batch_size,
                   help=f'contrastive global batch; its other views are the negatives (default {_DEFAULTS.pretrain_batch_size})')
    p.add_argument('--pretrain-lr', type=float, default=_DEFAULTS.pretrain_lr,
                   help=f'peak AdamW learning rate of the contrastive stage (default {_DEFAULTS.pretrain_lr})')
    p.add_argument('--temperature', type=float, default=_DEFAULTS.temperature,
                   help=f'NT-Xent temperature (default {_DEFAULTS.temperature})')
    p.add_argument('--hflip', action=argparse.BooleanOptionalAction, default=None,
                   help='mirror contrastive views (default: on, except for digits, where a mirrored glyph is another one)')
    p.add_argument('--batch-size', type=int, default=_DEFAULTS.batch_size, help='global batch size (default 64)')
    p.add_argument('--lr', type=float, default=_DEFAULTS.lr, help='AdamW learning rate (default 5e-4)')
    p.add_argument('--weight-decay', type=float, default=_DEFAULTS.weight_decay, help='AdamW weight decay (default 0.05)')
    p.add_argument('--kmeans-restarts', type=int, default=_DEFAULTS.kmeans_restarts, help='k-means++ restarts (default 4)')
    p.add_argument('--no-match-ids', dest='match_ids', action='store_false',
                   help='do not re-number each round\'s clusters to match the previous round\'s')
    p.add_argument('--seed', type=int, default=_DEFAULTS.seed)
    p.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', ...")
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads per process')
    p.add_argument('--out', default='./timm-supertoken-cluster', help='output folder (metrics, figures, checkpoint)')
    p.add_argument('--resume', action='store_true', help='continue from the checkpoint in --out')
    p.set_defaults(func=cmd_cluster)
    return p


def cmd_cluster(args: argparse.Namespace) -> int:
    """Load the data, print the settings, run the loop, print the per-round table."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    rank = int(os.environ.get('RANK', '0'))
    start = time.perf_counter()
    data, cfg = data_and_config(args)
    model_kwargs = cfg.model_kwargs
    if rank == 0:
        print(', '.join(f'{k}: {v}' for k, v in hardware_info().items()))
        print(f'data: {data.name}, {len(data)} images {tuple(data.images.shape[1:])}, {data.num_classes} classes')
        print(f'model: {cfg.model} {model_kwargs or ""} at {cfg.img_size}x{cfg.img_size}, '
              f'in_chans={cfg.in_chans or data.images.shape[1]}'
              + (' (scaled down from ViT-S depth 12 so the default run fits a CPU)' if model_kwargs == DEFAULT_MODEL_KWARGS
                 and cfg.model == DEFAULT_MODEL else ''))
        method = pretrain_method(cfg)
        if method != 'none':
            print(f'representation stage: {method}, {cfg.pretrain_epochs} epochs, batch {cfg.pretrain_batch_size}, '
                  f'lr {cfg.pretrain_lr}, temperature {cfg.temperature}, hflip={cfg.hflip}')
        initial = 'k-means of the contrastive embedding' if method != 'none' else 'k-means-on-pixels assignments'
        print(f'loop: targets={cfg.targets}' + (f' (round 0 trains on {initial})' if cfg.targets == 'pseudo' else '')
              + f', gamma={cfg.gamma}, eps={cfg.eps}, max_rounds={cfg.max_rounds}, epochs/round={cfg.epochs}, '
              f'augment={cfg.augment}, batch={cfg.batch_size}, lr={cfg.lr}, seed={cfg.seed}')
    result = run_deep_clustering(data, cfg, args.out, resume=args.resume)
    if rank == 0:
        print('\n' + results_markdown(result))
        print(f'\ndone in {time.perf_counter() - start:.1f} s')
    return 0


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
        kmeans_restarts=args.kmeans_restarts, match_ids=args.match_ids,
        pretrain=args.pretrain if args.pretrain is not None or args.dataset != 'digits' else 'none',
        pretrain_epochs=args.pretrain_epochs, pretrain_batch_size=args.pretrain_batch_size, pretrain_lr=args.pretrain_lr,
        temperature=args.temperature, hflip=args.hflip if args.hflip is not None else args.dataset != 'digits',
        seed=args.seed, device=args.device)
    return data, cfg

