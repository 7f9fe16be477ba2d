"""`timm-supertoken cluster`: ViT deep clustering from the command line (one process or under torchrun)."""
import argparse
import time
from typing import Tuple

from ..clustering.deep_clustering import (DEFAULT_MODEL, DEFAULT_MODEL_KWARGS, ClusterConfig, ClusterData,
                                          check_run, data_and_config_from, describe_readout, describe_rounds,
                                          pretrain_method, run_deep_clustering)
from ..clustering.report import results_markdown
from ..data.image_sets import ImageSet
from ..harness import init_distributed
from .options import add_command, add_config_options, add_out, add_resume, add_threads, print_preamble

__all__ = ['add_commands', 'add_cluster_arguments', 'cmd_cluster', 'data_and_config']


def cmd_cluster(args: argparse.Namespace) -> int:
    """ViT deep clustering on digits, Fashion-MNIST or an image folder.

    The method of "Deep Clustering Based on Vision Transformer (ViT) for Images": trains, embeds, clusters,
    retrains with L = L_ViT + gamma * L_clustering, and repeats while the loss drops by at least eps.
    Defaults: scikit-learn digits on CPU in a few minutes; for Fashion-MNIST a smaller model sized for 2 CPU cores.
    """
    start = time.perf_counter()
    data, cfg = data_and_config(args)
    env = init_distributed(cfg.device)
    check_run(data, cfg, env.world)  # a bad option is the first and only thing printed
    if env.is_primary:
        print_preamble(_settings(data, cfg))
    result = run_deep_clustering(data, cfg, args.out, resume=args.resume, env=env)
    if env.is_primary:
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
        + f', rounds={cfg.rounds} ({describe_rounds(cfg.rounds, cfg.readout)}), gamma={cfg.gamma}, eps={cfg.eps}, '
        f'max_rounds={cfg.max_rounds}, epochs/round={cfg.epochs}, '
        + (f'batch={cfg.pretrain_batch_size}' if cfg.rounds == 'views'
           else f'augment={cfg.augment}, batch={cfg.batch_size}')
        + f', lr={cfg.lr}, seed={cfg.seed}',
    )


def data_and_config(args: argparse.Namespace) -> Tuple[ImageSet, ClusterConfig]:
    """The dataset and run settings the `cluster` options describe (`deep_clustering.data_and_config_from`)."""
    return data_and_config_from(vars(args))


def add_cluster_arguments(p: argparse.ArgumentParser) -> None:
    """The `cluster` options: ClusterData's and ClusterConfig's fields, and where the run writes."""
    add_config_options(p, ClusterData)
    add_config_options(p, ClusterConfig)
    add_threads(p)
    add_out(p, './timm-supertoken-cluster', help='output folder (metrics, figures, checkpoint)')
    add_resume(p)


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `cluster`."""
    add_cluster_arguments(add_command(subparsers, cmd_cluster))
