"""What the contrastive stage's settings change: k-means, 20-NN and readout scores of its embedding.

    python benchmarks/bench_views.py [--subset 5000] [--variants '' 'view_scale=0.6,1' 'color_jitter=0' ...]
                                     [any `cluster` option, e.g. --dataset fashion-mnist --device cuda]

The deep-clustering loop starts from a readout of the representation stage's embedding and its rounds
keep that partition, so the stage decides the result.
Each variant overrides `ClusterConfig` fields of the base settings (`field=value`, tuples as `a,b`),
trains the stage from scratch and scores the embedding: NMI/ARI/ACC of k-means, the share of each
image's 20 nearest neighbours (cosine) with its label, which bounds what neighbour-based clustering can
reach, and the NMI of the loop's UMAP readout of pixels and embedding (round 0's targets by default).
Seeds are variants too, so the table shows the run-to-run spread next to each setting's effect.
The table goes to results/cluster_views.json and docs/benchmarks.md is rendered again.
"""
import dataclasses
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from timm_supertoken.clustering.deep_clustering import (ClusterConfig, create_embed_net, data_and_config_from, embed,
                                                        pretrain_representation, umap_readout)
from timm_supertoken.clustering.features import pixel_features
from timm_supertoken.clustering.kmeans import kmeans
from timm_supertoken.clustering.metrics import cluster_metrics
from timm_supertoken.harness import DistributedEnv

from bench_cluster import cluster_parser
from docs_page import Table, reproducing_command, result_record, write_result

NEIGHBOURS = 20
DEFAULT_VARIANTS = ('', 'seed=1', 'seed=2', 'view_scale=0.2,1', 'view_scale=0.6,1', 'view_scale=0.8,1',
                    'color_jitter=0', 'color_jitter=0.2', 'color_jitter=0.6', 'hflip=false', 'temperature=0.2')
# the CPU-sized setting of bench_cluster.py, on half its images: a variant takes about a minute on 2 cores
BENCH_DEFAULTS: Dict[str, Any] = dict(
    dataset='fashion-mnist:test', subset=5000, model_kwargs={'depth': 2, 'embed_dim': 128, 'num_heads': 4},
    img_size=16, pretrain_epochs=8, kmeans_restarts=4, batch_size=128)


def parse_variant(text: str, base: ClusterConfig) -> ClusterConfig:
    """'field=value field2=a,b' -> base with those fields replaced, typed like the base's values."""
    changes: Dict[str, Any] = {}
    for item in text.split():
        name, sep, value = item.partition('=')
        if not sep or not hasattr(base, name):
            raise ValueError(f'variant {text!r}: {item!r} is not field=value for a ClusterConfig field')
        current = getattr(base, name)
        if isinstance(current, bool):
            if value.lower() not in ('true', 'false'):
                raise ValueError(f'variant {text!r}: {name} takes true or false, got {value!r}')
            changes[name] = value.lower() == 'true'
        elif isinstance(current, tuple):
            changes[name] = tuple(type(v)(p) for v, p in zip(current, value.split(',')))
        else:
            changes[name] = type(current)(value)
    return dataclasses.replace(base, **changes)


@torch.no_grad()
def neighbour_agreement(z: torch.Tensor, labels: np.ndarray, k: int = NEIGHBOURS, chunk: int = 4096) -> float:
    """Share of each point's k nearest neighbours (cosine, itself excluded) that carry its label; chunked rows."""
    zn = F.normalize(z.float(), dim=1)
    y = torch.as_tensor(labels, device=z.device)
    agree = 0
    for start in range(0, zn.shape[0], chunk):
        sim = zn[start:start + chunk] @ zn.T
        sim[torch.arange(sim.shape[0]), torch.arange(start, start + sim.shape[0])] = float('-inf')
        idx = sim.topk(k, dim=1).indices
        agree += (y[idx] == y[start:start + chunk, None]).sum().item()
    return agree / (zn.shape[0] * k)


def score_variant(data, cfg: ClusterConfig, device: torch.device) -> Dict[str, float]:
    """Train the representation stage of cfg from scratch; k-means, neighbour and UMAP-readout scores of its
    embedding."""
    in_chans = cfg.in_chans or data.images.shape[1]
    net = create_embed_net(cfg, data.num_classes, in_chans, device)
    stage = pretrain_representation(net, data.images, cfg, in_chans, device)
    z = embed(net, data.images, cfg, in_chans, device)
    km = kmeans(z, data.num_classes, n_init=cfg.kmeans_restarts, seed=cfg.seed)
    readout = umap_readout(pixel_features(data.images, device, seed=cfg.seed), z, data.num_classes, cfg.kmeans_restarts, cfg.seed)
    return dict(cluster_metrics(data.labels, km.labels.cpu().numpy()), knn=neighbour_agreement(z, data.labels),
                umap_nmi=cluster_metrics(data.labels, readout.cpu().numpy())['nmi'],
                loss=stage['loss_contrastive'], time_s=stage['time_s'])


def write_views_result(rows: List[Dict[str, Any]], data, base: ClusterConfig, command: str, device: torch.device,
                       args) -> Path:
    """results/cluster_views.json: the data, the base settings, and one row per variant."""
    setting = [
        f'{data.name}, {len(data)} images, k = {data.num_classes}, {torch.get_num_threads()} torch threads. Base: '
        f'`{base.model}` {base.model_kwargs} at {base.img_size}×{base.img_size}; SimCLR {base.pretrain_epochs} '
        'epochs, '
        f'batch {base.pretrain_batch_size}, peak lr {base.pretrain_lr}, temperature {base.temperature}, '
        f'hflip={base.hflip}, view scale {base.view_scale[0]:g}-{base.view_scale[1]:g}, color jitter '
        f'{base.color_jitter:g}, seed {base.seed}; each variant changes one setting.',
        f'Scores of the embedding: k-means ({base.kmeans_restarts} restarts) NMI/ARI/ACC, the share of each image\'s '
        f'{NEIGHBOURS} nearest neighbours (cosine) with its label, and the NMI of the UMAP readout of pixels and '
        'embedding (round 0\'s targets).',
    ]
    table = Table(['variant', 'NMI', 'ARI', 'ACC', f'{NEIGHBOURS}-NN label agreement', 'UMAP readout NMI', 'NT-Xent',
                   'stage time (s)'],
                  [[r['variant'] or 'base', *(r[k] for k in ('nmi', 'ari', 'acc', 'knn', 'umap_nmi', 'loss', 'time_s'))]
                   for r in rows],
                  [None, '{:.4f}', '{:.4f}', '{:.4f}', '{:.4f}', '{:.4f}', '{:.3f}', '{:.1f}'])
    record = result_record('cluster_views', "Deep clustering: what the representation stage's settings change",
                           [table], setting, command=command, device=device)
    return write_result(record, args.results_dir, args.page)


def main(argv: Optional[List[str]] = None) -> None:
    """Score every variant, write the result and render the page."""
    argv = sys.argv[1:] if argv is None else argv
    parser = cluster_parser(__doc__.splitlines()[0], BENCH_DEFAULTS)
    parser.add_argument('--variants', nargs='+', default=list(DEFAULT_VARIANTS),
                        help="ClusterConfig overrides, one string per variant: '' (the base), 'view_scale=0.6,1', ...")
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data, base = data_and_config_from(vars(args))
    base = dataclasses.replace(base, pretrain='simclr')  # the stage this benchmark measures, digits included
    if data.labels is None:
        parser.error('the scores need labels; this dataset has none')
    try:  # a typo fails here, before any training
        variants = [(text, parse_variant(text, base)) for text in args.variants]
    except ValueError as e:
        parser.error(str(e))
    device = DistributedEnv.current(base.device).device
    rows = []
    for text, cfg in variants:
        start = time.perf_counter()
        row = dict(variant=text, **score_variant(data, cfg, device))
        rows.append(row)
        print(f'{text or "base":24s} NMI {row["nmi"]:.4f}  {NEIGHBOURS}-NN {row["knn"]:.4f}  '
              f'UMAP readout NMI {row["umap_nmi"]:.4f}  '
              f'{time.perf_counter() - start:.0f} s', flush=True)
    command = reproducing_command('bench_views.py', argv)
    path = write_views_result(rows, data, base, command, device, args)
    print(f'wrote {path} and {args.page}')


if __name__ == '__main__':
    main()
