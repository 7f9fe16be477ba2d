"""CPU-sized deep-clustering benchmark: Fashion-MNIST's 10k test images, as results/cluster_cpu.json.

    python benchmarks/bench_cluster.py [--subset 3000] [any `cluster` option]

Runs the `timm-supertoken cluster` loop (SimCLR stage, then the paper's rounds) with settings sized
for 2 CPU cores, and records NMI/ARI/ACC against k-means on the same pixels, the wall time and the
machine; docs/benchmarks.md is rendered again. Every `cluster` option is accepted; only the defaults
below differ from the command's.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from timm_supertoken.clustering.deep_clustering import (ClusterConfig, ClusterData, data_and_config_from,
                                                        describe_readout, pretrain_method, run_deep_clustering)
from timm_supertoken.config_fields import field_arguments
from timm_supertoken.clustering.report import results_markdown

from docs_page import PAGE, RESULTS_DIR, reproducing_command, result_record, tables_from_markdown, write_result

TARGET_GAIN = 0.10  # issue 13: NMI at least k-means-on-pixels + 0.10 on the same images
TARGET_MINUTES = 15
# a 0.5M-parameter vit_small_stconv (2 blocks of width 128) at 16×16, a fraction of the CLI's default
# depth-4 width-384 model's cost; on a 3,000-image subset 16×16 also clustered better than 32×32
BENCH_DEFAULTS: Dict[str, Any] = dict(
    dataset='fashion-mnist:test', model_kwargs={'depth': 2, 'embed_dim': 128, 'num_heads': 4}, img_size=16,
    pretrain_epochs=8, epochs=2, max_rounds=2, batch_size=128, kmeans_restarts=2)


def write_cluster_result(result: Dict[str, Any], command: str, wall_s: float, cpu_s: float, load: List[float],
                         args: argparse.Namespace) -> Path:
    """results/cluster_cpu.json: machine, settings, the per-round table, and the verdict on both targets.

    cpu_s (the process's CPU time, all threads) is reported beside the wall time: on a shared machine the
    wall time measures the other jobs too, while cpu_s / threads estimates the run on idle cores.
    """
    threads = torch.get_num_threads()
    pixels = result['baselines']['kmeans_pixels']['nmi']
    final = result['rounds'][-1]['nmi']
    gain, minutes = final - pixels, wall_s / 60
    gain_ok, time_ok = gain >= TARGET_GAIN, minutes <= TARGET_MINUTES
    setting = [*settings_lines(result),
               f'{threads} torch threads; 1-min load average {load[0]:.1f} / {load[1]:.1f} at start / end.']
    findings = [
        f'Final NMI {final:.4f} vs k-means on the same pixels {pixels:.4f}: **{gain:+.4f}** '
        f'(target ≥ +{TARGET_GAIN:.2f}: {"met" if gain_ok else "NOT met"}). Wall time **{minutes:.1f} min** '
        f'(target ≤ {TARGET_MINUTES} min on 2 cores: {"met" if time_ok else "NOT met"}); CPU time '
        f'{cpu_s / 60:.1f} min over {threads} threads.']
    _, tables = tables_from_markdown(results_markdown(result))
    record = result_record('cluster_cpu', 'Deep clustering: Fashion-MNIST test on CPU', tables, setting, findings,
                           command)
    return write_result(record, args.results_dir, args.page)


def settings_lines(result: Dict[str, Any]) -> List[str]:
    """Data, model, representation stage and loop of a run, a line each: what both clustering results state."""
    cfg = result['config']
    return [
        f'Data: {result["dataset"]}, {result["n"]} images, k = {result["k"]}.',
        f'Model: `{cfg["model"]}` {cfg["model_kwargs"]} at {cfg["img_size"]}×{cfg["img_size"]}.',
        f'Representation stage: {pretrain_method_name(cfg)}, {cfg["pretrain_epochs"]} epochs, batch '
        f'{cfg["pretrain_batch_size"]}, peak lr {cfg["pretrain_lr"]}, temperature {cfg["temperature"]}, '
        f'hflip={cfg["hflip"]}, view scale {cfg["view_scale"][0]:g}-{cfg["view_scale"][1]:g}, color jitter '
        f'{cfg["color_jitter"]:g}.',
        f'Round 0\'s pseudo-labels: {describe_readout(cfg["readout"], cfg["pretrain"])}.',
        f'Loop: targets={cfg["targets"]}, γ = {cfg["gamma"]}, ε = {cfg["eps"]}, {cfg["epochs"]} epochs per '
        f'round, max {cfg["max_rounds"]} rounds, batch {cfg["batch_size"]}, lr {cfg["lr"]}, seed {cfg["seed"]}; '
        f'stopped: {result["stop_reason"]}.',
    ]


def cluster_parser(description: str, defaults: Dict[str, Any]) -> argparse.ArgumentParser:
    """Every `cluster` option with a benchmark's own defaults, and where results go: the clustering benchmarks' CLI."""
    parser = argparse.ArgumentParser(description=description)
    for flags, kwargs in field_arguments(ClusterData) + field_arguments(ClusterConfig):
        parser.add_argument(*flags, **kwargs)
    parser.add_argument('--threads', type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument('--out', default=None, help="keep the run's own files here (default: a temporary folder)")
    parser.set_defaults(**defaults)
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    return parser


def pretrain_method_name(cfg: Dict[str, Any]) -> str:
    """'SimCLR (NT-Xent)' or 'none' for the table's settings line."""
    return {'simclr': 'SimCLR (NT-Xent)', 'none': 'none (round 0 starts from k-means on pixels)'}[cfg['pretrain']]


def main(argv: Optional[List[str]] = None) -> None:
    """Run the benchmark, write its result and render the page."""
    argv = sys.argv[1:] if argv is None else argv
    parser = cluster_parser(__doc__.splitlines()[0], BENCH_DEFAULTS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    data, cfg = data_and_config_from(vars(args))
    load_start = os.getloadavg()[0]
    start, cpu_start = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        result = run_deep_clustering(data, cfg, args.out or tmp)
    wall_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    result['config']['pretrain'] = pretrain_method(cfg)
    command = reproducing_command('bench_cluster.py', argv)
    path = write_cluster_result(result, command, wall_s, cpu_s, [load_start, os.getloadavg()[0]], args)
    print(f'{results_markdown(result)}\nwrote {path} and {args.page}')


if __name__ == '__main__':
    main()
