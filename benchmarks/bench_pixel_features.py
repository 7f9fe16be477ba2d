"""What bounding the pixel block costs the pixel baselines and the readout: `pixel_features` against the full rows.

    python benchmarks/bench_pixel_features.py [--datasets digits fashion-mnist:test] [--seeds 0 1]
                                              [--variants 32,128 32,64 32,256 16,none ...] [--threads N]

The k-means baseline and the UMAP readout take the pixels of every image; flattened at the stored size
that block grows with the image (`timm_supertoken.clustering.features`). Each variant `SIDE,DIMS`
is `pixel_features(max_side=SIDE, max_dims=DIMS)` ('none': no PCA); the first row of each dataset is
the full rows, as the loop took them before; a variant that gives the same features as a row above is
left out, except the default. Per variant and seed: the NMI of k-means on the features (the loop's
pixel baseline, its restarts) and of the loop's `umap_readout` of them alone, with the time to compute
the features and of the readout. The table goes to
results/pixel_features.json, off the page (its conclusion is the default in features.py), and
docs/benchmarks.md is rendered again.
"""
import argparse
import os
import statistics
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch

from timm_supertoken.clustering.deep_clustering import umap_readout
from timm_supertoken.clustering.features import PIXEL_MAX_DIMS, PIXEL_MAX_SIDE, pixel_features
from timm_supertoken.clustering.kmeans import kmeans
from timm_supertoken.clustering.metrics import nmi
from timm_supertoken.data import load_dataset

from docs_page import PAGE, RESULTS_DIR, Table, result_record, write_result

FULL_ROWS = 'full rows'
KMEANS_RESTARTS = 4  # ClusterConfig's default, as the loop runs its baseline and readout
DEFAULT = (PIXEL_MAX_SIDE, PIXEL_MAX_DIMS)
DEFAULT_VARIANTS = (f'{PIXEL_MAX_SIDE},{PIXEL_MAX_DIMS}', '32,64', '32,256', '16,none', '16,128')


def parse_variant(text: str) -> Tuple[int, Optional[int]]:
    """'SIDE,DIMS' -> (max_side, max_dims or None for 'none')."""
    side, _, dims = text.partition(',')
    try:
        return int(side), None if dims == 'none' else int(dims)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a variant is SIDE,DIMS with DIMS an integer or 'none', got {text!r}")


def effective(images: torch.Tensor, variant: Optional[Tuple[int, Optional[int]]]) -> Tuple[int, int, Optional[int]]:
    """What a variant does to these images: (thumbnail height, width, PCA dims or None)."""
    h, w = images.shape[-2:]
    if variant is None:
        return h, w, None
    side, dims = variant
    h, w = min(h, side), min(w, side)
    return h, w, dims if dims is not None and images.shape[1] * h * w > dims else None


def measure(images: torch.Tensor, labels, variant: Optional[Tuple[int, Optional[int]]], seeds: Sequence[int],
            device: torch.device) -> dict:
    """Features of one variant (None: the full rows) and, per seed, the NMI of k-means and of the readout."""
    k = int(labels.max()) + 1
    side, dims = variant or (max(images.shape[-2:]), None)
    nmi_kmeans, nmi_readout, readout_s, features_s = [], [], [], []
    for seed in seeds:
        start = time.perf_counter()
        features = pixel_features(images, device, max_side=side, max_dims=dims, seed=seed)
        features_s.append(time.perf_counter() - start)
        nmi_kmeans.append(nmi(labels, kmeans(features, k, n_init=KMEANS_RESTARTS, seed=seed).labels.cpu().numpy()))
        start = time.perf_counter()
        readout = umap_readout(features, None, k, KMEANS_RESTARTS, seed)
        readout_s.append(time.perf_counter() - start)
        nmi_readout.append(nmi(labels, readout.cpu().numpy()))
    return {'dims': features.shape[1], 'nmi_kmeans': statistics.mean(nmi_kmeans),
            'nmi_readout': statistics.mean(nmi_readout), 'readout_s': statistics.median(readout_s),
            'features_s': statistics.median(features_s)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--datasets', nargs='+', default=['digits', 'fashion-mnist:test'])
    parser.add_argument('--variants', nargs='+', type=parse_variant, default=list(map(parse_variant, DEFAULT_VARIANTS)),
                        help="SIDE,DIMS of pixel_features; DIMS 'none' keeps the thumbnail whole")
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1], help='k-means and layout seeds, averaged')
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device('cpu')

    rows: List[list] = []
    for name in args.datasets:
        data = load_dataset(name)
        full, seen = None, set()
        for variant in [None, *args.variants]:
            key = effective(data.images, variant)
            if key in seen and variant != DEFAULT:
                continue  # the same features as a row above
            seen.add(key)
            m = measure(data.images, data.labels, variant, args.seeds, device)
            full = full or m
            label = FULL_ROWS if variant is None else f'max_side={variant[0]}, max_dims={variant[1]}'
            rows.append([data.name, label, m['dims'], m['nmi_kmeans'], m['nmi_kmeans'] - full['nmi_kmeans'],
                         m['nmi_readout'], m['nmi_readout'] - full['nmi_readout'], m['features_s'], m['readout_s']])
            print(' | '.join(f'{c:.4f}' if isinstance(c, float) else str(c) for c in rows[-1]), flush=True)
    table = Table(
        columns=['images', 'pixel features', 'dims', 'k-means NMI', 'Δ', 'readout NMI', 'Δ', 'features s',
                 'readout s'],
        rows=rows, formats=[None, None, '{:,}', '{:.4f}', '{:+.4f}', '{:.4f}', '{:+.4f}', '{:.2f}', '{:.1f}'],
        on_page=False)  # the page keeps a pointer: its conclusion is features.py's default
    setting = [f'`pixel_features(max_side, max_dims)` against the full rows; NMI averaged over seeds '
               f'{", ".join(map(str, args.seeds))} (k-means with {KMEANS_RESTARTS} restarts; the readout is '
               f'`umap_readout` of the features alone); times are medians, {args.threads} threads']
    record = result_record('pixel_features', 'Bounded pixel features for the baselines and the readout', [table],
                           setting=setting)
    write_result(record, args.results_dir, args.page)


if __name__ == '__main__':
    main()
