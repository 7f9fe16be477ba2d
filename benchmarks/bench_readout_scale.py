"""How the UMAP readout and k-means scale with the number of points, as results/readout_scale.json.

    python benchmarks/bench_readout_scale.py [--sizes 70000 280000 1000000] [--threads 2]

Each size runs in a fresh subprocess (so its RSS high-water mark is its own): the readout's stages
(neighbours, fuzzy graph, spectral start, SGD layout) and k-means on the layout, each timed in wall and
CPU seconds. The points are 128-d: a PCA of Fashion-MNIST's 70,000 images (real), and for larger sizes
those points replicated with Gaussian noise, each copy keeping its image's label (augmented). Every size
uses the approximate search, so the fitted growth exponent is the scalable path's; at 70k the exact
search runs too, for recall@k and the NMI it would give. At larger sizes recall is measured on a sample
of rows against their exact neighbours.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from timm_supertoken.clustering import cluster_metrics, kmeans
from timm_supertoken.clustering.manifold import (SPECTRAL_MAX_N, _exact_rows, fuzzy_graph, nearest_neighbors,
                                                 optimize_layout, pca_layout, spectral_layout)
from timm_supertoken.data import load_dataset

from docs_page import PAGE, RESULTS_DIR, Table, met, render_section, result_record, write_result

DIM = 128
NEIGHBORS = 30
LAYOUT_DIM = 10
NOISE = 0.1  # an augmented copy's noise, per feature, as a fraction of that feature's spread
RECALL_SAMPLE = 2000  # rows whose exact neighbours are computed where the full exact search is too slow
TARGET_EXPONENT = 1.2
TARGET_MINUTES_1M = 20
STAGES = ('neighbours', 'graph', 'start', 'layout', 'kmeans')


def fashion_points(n: int, seed: int) -> Tuple[torch.Tensor, np.ndarray, str]:
    """n 128-d points with labels: the PCA of the 70k images, or those plus noisy copies beyond 70k."""
    data = load_dataset('fashion-mnist')
    pixels = data.images.reshape(len(data), -1).float() / 255
    pixels -= pixels.mean(0)
    torch.manual_seed(seed)  # pca_lowrank's random sketch
    _, _, basis = torch.pca_lowrank(pixels, q=DIM, center=False, niter=2)
    real = pixels @ basis
    labels = np.asarray(data.labels)
    if n <= len(real):
        return real[:n], labels[:n], 'real (PCA of the pixels)'
    gen = torch.Generator().manual_seed(seed)
    source = torch.arange(n) % len(real)
    points = real[source] + NOISE * real.std(0) * torch.randn(n, DIM, generator=gen)
    points[:len(real)] = real  # the real points stay as they are
    return points, labels[source.numpy()], f'augmented ({len(real):,} real + noisy copies)'


def timed(record: Dict[str, Any], stage: str, work: Callable[[], Any]) -> Any:
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    record[stage] = {'wall_s': time.perf_counter() - wall, 'cpu_s': time.process_time() - cpu}
    print(f'  {stage}: {record[stage]["wall_s"]:.1f} s', file=sys.stderr, flush=True)
    return result


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    """Fraction of the exact k neighbours that the approximate search found, over all rows given."""
    return sum((a.unsqueeze(2) == e.unsqueeze(1)).any(2).sum().item()
               for a, e in zip(approx.split(8192), exact.split(8192))) / exact.numel()


def readout(x: torch.Tensor, labels: np.ndarray, knn: str, seed: int, start: str) -> Dict[str, Any]:
    """The readout of `umap_layout`, stage by stage, and k-means on it: times, NMI and the neighbours."""
    record: Dict[str, Any] = {'knn': knn, 'start': start}
    idx, dist = timed(record, 'neighbours', lambda: nearest_neighbors(x, NEIGHBORS, knn, seed=seed))
    graph = timed(record, 'graph', lambda: fuzzy_graph(idx, dist))
    initial = timed(record, 'start', lambda: pca_layout(x, LAYOUT_DIM, seed) if start == 'pca'
                    else spectral_layout(graph, LAYOUT_DIM, seed))
    layout = timed(record, 'layout', lambda: optimize_layout(graph, initial, seed=seed))
    clusters = timed(record, 'kmeans', lambda: kmeans(layout, int(labels.max()) + 1, seed=seed).labels)
    record['edges'] = graph.values().numel()
    record['nmi'] = cluster_metrics(labels, clusters.numpy())['nmi']
    record['idx'] = idx
    return record


def run_size(n: int, seed: int) -> Dict[str, Any]:
    """One size, in this process: the approximate readout, its recall, and at 70k and below the exact one.

    The start is umap_layout's 'auto' choice; at 70k and below the PCA start runs as well, scored beside the
    eigenmap's, which is what the choice above SPECTRAL_MAX_N rests on.
    """
    x, labels, source = fashion_points(n, seed)
    result: Dict[str, Any] = {'n': n, 'points': source}
    approx = readout(x, labels, 'approximate', seed, 'pca' if n > SPECTRAL_MAX_N else 'spectral')
    if n <= 70_000:
        exact = readout(x, labels, 'exact', seed, 'spectral')
        result['recall'], result['recall_rows'] = recall(approx['idx'], exact.pop('idx')), n
        result['exact'] = exact
        result['pca_start_nmi'] = readout(x, labels, 'approximate', seed, 'pca')['nmi']
    else:
        rows = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:RECALL_SAMPLE]
        xn = torch.nn.functional.normalize(x, dim=1)
        result['recall'] = recall(approx['idx'][rows], _exact_rows(xn, rows, NEIGHBORS, 512)[1])
        result['recall_rows'] = RECALL_SAMPLE
    approx.pop('idx')
    result['approximate'] = approx
    result['peak_rss_gb'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB on Linux
    return result


def growth_exponent(sizes: Sequence[int], seconds: Sequence[float]) -> float:
    """The slope of log time against log n, least squares."""
    return float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])


def total(record: Dict[str, Any], clock: str) -> float:
    return sum(record[stage][clock] for stage in STAGES)


def tables(results: List[Dict[str, Any]]) -> List[Table]:
    rows = []
    for r in results:
        for knn in ('approximate', 'exact'):
            if knn in r:
                s = r[knn]
                rows.append([f'{r["n"]:,}', knn, *(s[stage]['wall_s'] for stage in STAGES), total(s, 'wall_s'),
                             total(s, 'cpu_s'), r['peak_rss_gb'] if knn == 'approximate' else None,
                             r['recall'] if knn == 'approximate' else None, s['nmi']])
    stages = Table(
        columns=['n', 'k-NN', *(f'{stage} s' for stage in STAGES), 'total s', 'CPU s', 'peak RSS GB',
                 f'recall@{NEIGHBORS}', 'NMI'],
        rows=rows, formats=[None, None, *['{:.1f}'] * 7, '{:.2f}', '{:.4f}', '{:.4f}'])
    detail = Table(
        columns=['n', 'points', 'graph edges', 'recall rows'],
        rows=[[r['n'], r['points'], r['approximate']['edges'], r['recall_rows']] for r in results],
        formats=['{:,}', None, '{:,}', '{:,}'], title='Points and graph per size', on_page=False)
    return [stages, detail]


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', type=int, nargs='+', default=[70_000, 280_000, 1_000_000])
    parser.add_argument('--threads', type=int, default=2, help='torch threads of each size\'s process')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    parser.add_argument('--one-size', type=int, help=argparse.SUPPRESS)  # a worker: one size, JSON on stdout
    args = parser.parse_args(argv)
    if args.one_size is not None:
        torch.set_num_threads(args.threads)
        print(json.dumps(run_size(args.one_size, args.seed)))
        return
    if min(args.sizes) <= NEIGHBORS + LAYOUT_DIM or args.threads < 1:
        parser.error(f'every size must exceed {NEIGHBORS + LAYOUT_DIM} points and --threads must be >= 1')

    load_at_start = os.getloadavg()[0]
    results = []
    for n in sorted(args.sizes):  # the record is written after each size, so a long run leaves its sizes so far
        print(f'{n:,} points', file=sys.stderr, flush=True)
        worker = subprocess.run([sys.executable, __file__, '--one-size', str(n), '--threads', str(args.threads),
                                 '--seed', str(args.seed)], stdout=subprocess.PIPE, check=True, text=True)
        results.append(json.loads(worker.stdout))
        record = scale_record(results, args.threads, [load_at_start, os.getloadavg()[0]])
        write_result(record, args.results_dir, args.page)
    print(render_section(record))


def scale_record(results: List[Dict[str, Any]], threads: int, load: List[float]) -> Dict[str, Any]:
    """The result file of the sizes run so far: the table, the exponent and the targets' verdicts."""
    sizes = [r['n'] for r in results]
    findings = []
    if len(results) > 1:
        wall = growth_exponent(sizes, [total(r['approximate'], 'wall_s') for r in results])
        cpu = growth_exponent(sizes, [total(r['approximate'], 'cpu_s') for r in results])
        findings.append(f'Growth exponent of the total time over {sizes[0]:,} → {sizes[-1]:,} points (least squares '
                        f'on log-log): **{wall:.2f}** wall, {cpu:.2f} CPU (target ≤ {TARGET_EXPONENT}: '
                        f'{met(wall <= TARGET_EXPONENT)}).')
    largest = results[-1]
    if largest['n'] >= 1_000_000:
        minutes = total(largest['approximate'], 'wall_s') / 60
        findings.append(f'{largest["n"]:,} points read out and clustered in **{minutes:.1f} min** wall '
                        f'(target ≤ {TARGET_MINUTES_1M} min on 2 cores: '
                        f'{met(minutes <= TARGET_MINUTES_1M)}), peak RSS '
                        f'{largest["peak_rss_gb"]:.2f} GB.')
    for r in results:
        if 'exact' in r:
            findings.append(f'At {r["n"]:,} points the approximate search finds {r["recall"]:.4f} of the exact '
                            f'{NEIGHBORS} neighbours; NMI {r["approximate"]["nmi"]:.4f} against the exact '
                            f'search\'s {r["exact"]["nmi"]:.4f} '
                            f'({r["approximate"]["nmi"] - r["exact"]["nmi"]:+.4f}); from the PCA start (taken '
                            f'above {SPECTRAL_MAX_N:,} points) NMI {r["pca_start_nmi"]:.4f}.')
    setting = [
        f'Points: {DIM}-d, a PCA of Fashion-MNIST\'s 70,000 images; beyond 70k, noisy copies of them (noise '
        f'{NOISE:g} × each feature\'s spread), with their image\'s label.',
        f'Readout: {NEIGHBORS} neighbours, {LAYOUT_DIM}-d layout started at the eigenmap up to {SPECTRAL_MAX_N:,} '
        f'points and at the PCA above, 200 epochs, then k-means (k = 10, 4 restarts); '
        f'each size in a fresh process on {threads} torch thread(s), peak RSS its high-water mark.',
        f'1-min load average {load[0]:.1f} / {load[1]:.1f} at start / end (a shared machine inflates the wall '
        f'times; CPU s counts every thread).',
    ]
    record = result_record('readout_scale', 'UMAP readout and k-means: time and memory against n', tables(results),
                           setting, findings)
    record['runs'] = results
    return record


if __name__ == '__main__':
    main()
