"""`timm-supertoken compare` (the paper's experiment) and `timm-supertoken recipe` (the shipped train.py YAMLs)."""
import argparse
import time
from pathlib import Path
from typing import List

from ..data.image_sets import load_splits
from ..harness import init_distributed
from ..training.compare import (
    FIGURE_NAME, FROM_RECIPE, QUICK_RECIPE, RECIPE_OPTIONS, RESULTS_CSV, RESULTS_JSON, RUN_OPTIONS, CompareConfig,
    build_compare_config, check_model_specs, quick_recipe_note, results_markdown, run_compare)
from ..training.recipe import Recipe, recipe_names, recipe_path, recipe_to_yaml
from .options import add_command, add_config_options, add_threads, print_preamble

__all__ = ['add_commands', 'cmd_compare', 'cmd_recipe']


def cmd_compare(args: argparse.Namespace) -> int:
    """Train the three embeddings under one recipe and compare them (paper Table 6, Fig. 3).

    Each model trains under the same recipe (timm transforms with RandAugment and random erasing, Mixup/CutMix,
    SoftTargetCrossEntropy, AdamW, cosine schedule with warm-up), evaluates top-1 after every epoch, times
    inference side by side and writes a table (CSV, JSON) and the accuracy-per-epoch figure. Defaults: the
    quick_digits recipe, which finishes in minutes on 2 CPU cores. Runs under torchrun for data parallelism
    (gloo on CPU, NCCL on GPU).
    """
    start = time.perf_counter()
    notes: List[str] = []
    cfg = build_compare_config(args.config, log=notes.append,
                               **{name: getattr(args, name) for name in RUN_OPTIONS + RECIPE_OPTIONS})
    check_model_specs(cfg)  # a misspelt model or keyword, or missing data, is the first and only thing printed
    splits = load_splits(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.seed)
    env = init_distributed(cfg.device)
    if env.is_primary:
        print_preamble([
            f'recipe {args.config} ({recipe_path(args.config)}), after command-line options:',
            '  ' + recipe_to_yaml(cfg.recipe).strip().replace('\n', '\n  '),
            *notes,
            f'models: {", ".join(cfg.models)}; model kwargs for all: {cfg.model_kwargs or "none"}; '
            f'dataset {cfg.dataset}, {cfg.img_size}×{cfg.img_size}, seed {cfg.seed}, world size {env.world}',
            *([quick_recipe_note(cfg)] if args.config == QUICK_RECIPE else []),
        ])
    results = run_compare(cfg, splits=splits, env=env)
    if env.is_primary:
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
    add_config_options(p, CompareConfig, RUN_OPTIONS, none_means=FROM_RECIPE)
    add_config_options(p, Recipe, RECIPE_OPTIONS, none_means={name: "the recipe's" for name in RECIPE_OPTIONS},
                       fallback_help='recipe override (train.py meaning)')
    add_threads(p)

    r = add_command(subparsers, cmd_recipe)
    r.add_argument('name', nargs='?', default=None, help='recipe name; without one, list them all')
    r.add_argument('--show', action='store_true', help='print the file instead of its path')
