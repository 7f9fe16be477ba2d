"""`timm-supertoken compare` (the paper's experiment) and `timm-supertoken recipe` (the shipped train.py YAMLs)."""
import argparse
import os
import time
from pathlib import Path
from typing import List

import torch
from timm.utils import ParseKwargs

from ..runtime import hardware_info
from ..data import DATASETS, FASHION_MNIST_DIR
from .compare import (
    FIGURE_NAME, QUICK_RECIPE, RESULTS_CSV, RESULTS_JSON, build_compare_config, quick_recipe_note, results_markdown,
    run_compare)
from .recipe import recipe_names, recipe_path, recipe_to_yaml

__all__ = ['add_training_commands']

# recipe options that the command line can override, by train.py name
_RECIPE_OPTIONS = (('epochs', int), ('batch_size', int), ('lr', float), ('weight_decay', float), ('warmup_epochs', int),
                   ('mixup', float), ('cutmix', float), ('aa', str), ('reprob', float), ('smoothing', float),
                   ('drop_path', float), ('sched', str), ('opt', str))


def cmd_compare(args: argparse.Namespace) -> int:
    """Print the settings, train every model, print the Table 6-style comparison."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rank = int(os.environ.get('RANK', '0'))
    notes: List[str] = []
    cfg = build_compare_config(
        args.config, args.models, args.model_kwargs, args.dataset, args.data_dir, args.img_size, args.seed, args.device,
        args.workers, args.out, args.resume, log=notes.append, model_ema=args.model_ema or None,
        **{name: getattr(args, name) for name, _ in _RECIPE_OPTIONS})
    if rank == 0:
        print(', '.join(f'{k}: {v}' for k, v in hardware_info().items()))
        print(f'recipe {args.config} ({recipe_path(args.config)}), after command-line options:')
        print('  ' + recipe_to_yaml(cfg.recipe).strip().replace('\n', '\n  '))
        for note in notes:
            print(note)
        print(f'models: {", ".join(cfg.models)}; model kwargs for all: {cfg.model_kwargs or "none"}; '
              f'dataset {cfg.dataset}, {cfg.img_size}×{cfg.img_size}, seed {cfg.seed}, world size '
              f'{os.environ.get("WORLD_SIZE", "1")}')
        if args.config == QUICK_RECIPE:
            print(quick_recipe_note(cfg))
    results = run_compare(cfg)
    if rank == 0:
        out = Path(cfg.out)
        print('\n' + results_markdown(results))
        print(f'\nwrote {out / RESULTS_CSV}, {out / RESULTS_JSON}, {out / FIGURE_NAME}; checkpoints in '
              f'{out}/<model>/last.pth.tar (timm-supertoken export turns one into Hub files)')
        print(f'done in {time.perf_counter() - start:.1f} s')
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """List the shipped recipes, or print one's path (for train.py --config) or its contents."""
    if args.name is None:
        for name in recipe_names():
            print(f'{name:36s} {recipe_path(name)}')
        return 0
    path = recipe_path(args.name)
    print(path.read_text() if args.show else path)
    return 0


def add_training_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `compare` and `recipe` on the main parser's subparsers."""
    p = subparsers.add_parser(
        'compare', help='train the three embeddings under one recipe and compare them (paper Table 6, Fig. 3)',
        description='Trains each model with the same recipe (timm transforms with RandAugment and random erasing, '
                    'Mixup/CutMix, SoftTargetCrossEntropy, AdamW, cosine schedule with warm-up), evaluates top-1 '
                    'after every epoch, times inference side by side and writes a table (CSV, JSON) and the '
                    'accuracy-per-epoch figure. Defaults: the quick_digits recipe, which finishes in minutes '
                    'on 2 CPU cores. Runs under torchrun for data parallelism (gloo on CPU, NCCL on GPU).')
    p.add_argument('--config', default=QUICK_RECIPE,
                   help=f'recipe: a shipped name ({", ".join(recipe_names())}) or a train.py YAML path '
                        f'(default {QUICK_RECIPE})')
    p.add_argument('--models', nargs='+', default=None, metavar='SPEC',
                   help='timm names, each optionally with kwargs: vit_small_stconv:conv_modules=4,cluster_iters=2 '
                        '(default: the recipe\'s model, else the three)')
    p.add_argument('--model-kwargs', nargs='*', default=None, action=ParseKwargs,
                   help='create_model kwargs for every model, e.g. depth=4 embed_dim=192 (default: the recipe\'s)')
    p.add_argument('--dataset', choices=DATASETS, default='digits', help='default: digits (embedded)')
    p.add_argument('--data-dir', default=None,
                   help=f'Fashion-MNIST idx folder (default {FASHION_MNIST_DIR}) or a folder with train/ and val/')
    p.add_argument('--img-size', type=int, default=None, help='input side (default: the recipe\'s)')
    for name, kind in _RECIPE_OPTIONS:
        p.add_argument(f'--{name.replace("_", "-")}', type=kind, default=None, help='recipe override (train.py meaning)')
    p.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights and evaluate it too')
    p.add_argument('--seed', type=int, default=None)
    p.add_argument('--device', default='auto', help="'auto' (CUDA if available), 'cpu', 'cuda', ...")
    p.add_argument('--workers', type=int, default=None,
                   help='data-loader processes per rank (default: on a GPU, the cores per rank minus one; on CPU 0)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads per process')
    p.add_argument('--out', default='./timm-supertoken-compare', help='output folder')
    p.add_argument('--resume', action='store_true', help='continue from the checkpoints in --out')
    p.set_defaults(func=cmd_compare)

    r = subparsers.add_parser('recipe', help='list the shipped train.py recipes, or print one\'s path',
                              description='Shipped YAML recipes for timm train.py --config (and compare --config).')
    r.add_argument('name', nargs='?', default=None, help='recipe name; without one, list them all')
    r.add_argument('--show', action='store_true', help='print the file instead of its path')
    r.set_defaults(func=cmd_recipe)
