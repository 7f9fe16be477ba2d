"""`timm-supertoken compare` (the paper's experiment) and `timm-supertoken recipe` (the shipped train.py YAMLs)."""
import argparse
import os
import time
from pathlib import Path
from typing import List

from ..data.image_sets import DATASETS
from ..training.compare import (
    FIGURE_NAME, QUICK_RECIPE, RESULTS_CSV, RESULTS_JSON, build_compare_config, quick_recipe_note, results_markdown,
    run_compare)
from ..training.recipe import recipe_names, recipe_path, recipe_to_yaml
from .options import (
    add_command, add_data_dir, add_device, add_img_size, add_model_kwargs, add_out, add_resume, add_seed, add_threads,
    print_preamble)

__all__ = ['add_commands', 'cmd_compare', 'cmd_recipe']

# recipe options that the command line can override, by train.py name
_RECIPE_OPTIONS = (('epochs', int), ('batch_size', int), ('lr', float), ('weight_decay', float), ('warmup_epochs', int),
                   ('mixup', float), ('cutmix', float), ('aa', str), ('reprob', float), ('smoothing', float),
                   ('drop_path', float), ('sched', str), ('opt', str))


def cmd_compare(args: argparse.Namespace) -> int:
    """Train the three embeddings under one recipe and compare them (paper Table 6, Fig. 3).

    Each model trains under the same recipe (timm transforms with RandAugment and random erasing, Mixup/CutMix,
    SoftTargetCrossEntropy, AdamW, cosine schedule with warm-up), evaluates top-1 after every epoch, times
    inference side by side and writes a table (CSV, JSON) and the accuracy-per-epoch figure. Defaults: the
    quick_digits recipe, which finishes in minutes on 2 CPU cores. Runs under torchrun for data parallelism
    (gloo on CPU, NCCL on GPU).
    """
    start = time.perf_counter()
    rank = int(os.environ.get('RANK', '0'))
    notes: List[str] = []
    cfg = build_compare_config(
        args.config, args.models, args.model_kwargs, args.dataset, args.data_dir, args.img_size, args.seed, args.device,
        args.workers, args.out, args.resume, log=notes.append, model_ema=args.model_ema or None,
        **{name: getattr(args, name) for name, _ in _RECIPE_OPTIONS})
    if rank == 0:
        print_preamble([
            f'recipe {args.config} ({recipe_path(args.config)}), after command-line options:',
            '  ' + recipe_to_yaml(cfg.recipe).strip().replace('\n', '\n  '),
            *notes,
            f'models: {", ".join(cfg.models)}; model kwargs for all: {cfg.model_kwargs or "none"}; '
            f'dataset {cfg.dataset}, {cfg.img_size}×{cfg.img_size}, seed {cfg.seed}, world size '
            f'{os.environ.get("WORLD_SIZE", "1")}',
            *([quick_recipe_note(cfg)] if args.config == QUICK_RECIPE else []),
        ])
    results = run_compare(cfg)
    if rank == 0:
        out = Path(cfg.out)
        print('\n' + results_markdown(results))
        print(f'\nwrote {out / RESULTS_CSV}, {out / RESULTS_JSON}, {out / FIGURE_NAME}; checkpoints in '
              f'{out}/<model>/last.pth.tar (timm-supertoken export turns one into Hub files)')
        print(f'done in {time.perf_counter() - start:.1f} s')
    return 0


def cmd_recipe(args: argparse.Namespace) -> int:
    """List the shipped train.py recipes, or print one's path.

    The recipes are YAML files for timm train.py --config (and compare --config).
    """
    if args.name is None:
        for name in recipe_names():
            print(f'{name:36s} {recipe_path(name)}')
        return 0
    path = recipe_path(args.name)
    print(path.read_text() if args.show else path)
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    """Register `compare` and `recipe`."""
    p = add_command(subparsers, cmd_compare)
    p.add_argument('--config', default=QUICK_RECIPE,
                   help=f'recipe: a shipped name ({", ".join(recipe_names())}) or a train.py YAML path '
                        f'(default {QUICK_RECIPE})')
    p.add_argument('--models', nargs='+', default=None, metavar='SPEC',
                   help='timm names, each optionally with kwargs: vit_small_stconv:conv_modules=4,cluster_iters=2 '
                        '(default: the recipe\'s model, else the three)')
    add_model_kwargs(p, help='create_model kwargs for every model, e.g. depth=4 embed_dim=192 '
                             '(default: the recipe\'s)')
    p.add_argument('--dataset', choices=DATASETS, default='digits', help='default: digits (embedded)')
    add_data_dir(p, otherwise='a folder with train/ and val/')
    add_img_size(p, None, help='input side (default: the recipe\'s)')
    for name, kind in _RECIPE_OPTIONS:
        p.add_argument(f'--{name.replace("_", "-")}', type=kind, default=None, help='recipe override (train.py meaning)')
    p.add_argument('--model-ema', action='store_true', help='keep an EMA of the weights and evaluate it too')
    add_seed(p, None, help='random seed (default: the recipe\'s, else 0)')
    add_device(p)
    p.add_argument('--workers', type=int, default=None,
                   help='data-loader processes per rank (default: on a GPU, the cores per rank minus one; on CPU 0)')
    add_threads(p)
    add_out(p, './timm-supertoken-compare', help='output folder')
    add_resume(p)

    r = add_command(subparsers, cmd_recipe)
    r.add_argument('name', nargs='?', default=None, help='recipe name; without one, list them all')
    r.add_argument('--show', action='store_true', help='print the file instead of its path')
