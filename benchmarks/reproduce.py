"""Scaled replication of paper 000 Tables 6-8 with `timm-supertoken compare`, written to docs/reproduction.md.

    python benchmarks/reproduce.py                       # quick_digits on CPU, 3 seeds: ~15 min on 2 cores
    python benchmarks/reproduce.py --config fashion_mnist --dataset fashion-mnist --seeds 0 --epochs 100  # GPU

Three experiments, each one `compare` run per seed under a single recipe:
- Table 6: the three embeddings (top-1 mean ± std over seeds, parameters, throughput);
- Table 7: vit_small_stconv with 0, 1, 2, 4, 6 conv modules and 6 + an extra conv (`conv_modules=7`);
- Table 8: vit_small_stconv with t = 1..4 clustering iterations, with throughput.
Every model of one experiment is timed side by side in the same process after training. The page
names the hardware and the recipe, and puts the paper's numbers beside ours.
"""
import argparse
import datetime
import statistics
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import torch

from timm_supertoken.benchmark import hardware_info
from timm_supertoken.training import run_compare
from timm_supertoken.training.cli import QUICK_RECIPE, build_compare_config
from timm_supertoken.training.recipe import recipe_to_yaml

DEFAULT_OUTPUT = Path(__file__).resolve().parents[1] / 'docs' / 'reproduction.md'
EMBEDDINGS = ('vit_small_patch', 'vit_small_convembed', 'vit_small_stconv')
# paper 000, ImageNet-100 top-1 after 300 epochs (Table 6), per conv-module count (Table 7), per t (Table 8)
PAPER_TABLE_6 = {'vit_small_patch': 78.44, 'vit_small_convembed': 81.14, 'vit_small_stconv': 83.52}
PAPER_TABLE_7 = {0: 48.26, 1: 80.20, 2: 80.68, 4: 82.18, 6: 83.52, 7: 81.50}
PAPER_TABLE_8 = {1: (766, 82.96), 2: (749, 83.02), 3: (737, 83.52), 4: (718, 83.30)}  # (img/s RTX 3060 Ti, top-1)
CONV_MODULES = (0, 1, 2, 4, 6, 7)
ITERS = (1, 2, 3, 4)


def run_experiment(name: str, specs: Sequence[str], seeds: Sequence[int], args: argparse.Namespace) -> Dict[str, Any]:
    """One compare run per seed; per spec: the list of runs' results."""
    per_spec: Dict[str, List[Dict[str, Any]]] = {spec: [] for spec in specs}
    for seed in seeds:
        t0 = time.perf_counter()
        cfg = build_compare_config(args.config, models=specs, dataset=args.dataset, data_dir=args.data_dir,
                                   img_size=args.img_size, seed=seed, device=args.device, workers=args.workers,
                                   out=str(Path(args.work_dir) / name / f'seed{seed}'), resume=True, epochs=args.epochs)
        results = run_compare(cfg, log=lambda s: None)
        for spec in specs:
            per_spec[spec].append(results['models'][spec])
        print(f'{name} seed {seed}: ' + ', '.join(f'{s} {r["top1"]:.2f}' for s, r in results['models'].items())
              + f' ({time.perf_counter() - t0:.0f} s)', flush=True)
    return {'per_spec': per_spec, 'config': cfg, 'throughput': results['throughput']}


def _top1(runs: List[Dict[str, Any]]) -> str:
    """Mean ± std of the last-epoch top-1 over seeds (just the value for one seed)."""
    values = [r['top1'] for r in runs]
    return f'{values[0]:.2f}' if len(values) == 1 else f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def _speed(runs: List[Dict[str, Any]]) -> str:
    """Median over seeds of the inference throughput and of its ratio to the experiment's first model."""
    return (f'{statistics.median(r["img_per_s"] for r in runs):.0f} | '
            f'{statistics.median(r["throughput_ratio"] for r in runs):.3f}×')


def _model_table(exp: Dict[str, Any], first_column: str, labels: Sequence[str], paper: Sequence[float]) -> str:
    """One row per spec: label, parameters, throughput, our top-1, the paper's top-1."""
    lines = [f'| {first_column} | params | embedding params | img/s | ratio | top-1 (ours) | top-1 (paper) |',
             '|---|---:|---:|---:|---:|---:|---:|']
    for runs, label, theirs in zip(exp['per_spec'].values(), labels, paper):
        r = runs[0]
        lines.append(f'| {label} | {r["params"] / 1e6:.2f}M | {r["embed_params"]:,} | {_speed(runs)} | {_top1(runs)} '
                     f'| {theirs:.2f} |')
    return '\n'.join(lines)


def table_6(exp: Dict[str, Any]) -> str:
    """The three embeddings, ours beside the paper's (ImageNet-100)."""
    return _model_table(exp, 'embedding', EMBEDDINGS, [PAPER_TABLE_6[m] for m in EMBEDDINGS])


def table_7(exp: Dict[str, Any]) -> str:
    """Conv modules before the clustering, ours beside the paper's."""
    labels = [{0: 'none (clustering only)', 1: '1', 7: '1-6 + additional conv'}.get(n, f'1-{n}') for n in CONV_MODULES]
    return _model_table(exp, 'conv modules', labels, [PAPER_TABLE_7[n] for n in CONV_MODULES])


def table_8(exp: Dict[str, Any]) -> str:
    """Clustering iterations t, with throughput, ours beside the paper's."""
    lines = ['| t | img/s (ours) | ratio to t=1 | top-1 (ours) | img/s (paper, RTX 3060 Ti) | top-1 (paper) |',
             '|---|---:|---:|---:|---:|---:|']
    for (spec, runs), t in zip(exp['per_spec'].items(), ITERS):
        lines.append(f'| {t} | {_speed(runs)} | {_top1(runs)} | {PAPER_TABLE_8[t][0]} | {PAPER_TABLE_8[t][1]:.2f} |')
    return '\n'.join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--config', default=QUICK_RECIPE, help=f'recipe (default {QUICK_RECIPE})')
    parser.add_argument('--dataset', default='digits')
    parser.add_argument('--data-dir', default=None)
    parser.add_argument('--img-size', type=int, default=None)
    parser.add_argument('--epochs', type=int, default=None, help='override the recipe\'s epochs')
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds of Table 6 (default 0 1 2)')
    parser.add_argument('--ablation-seeds', type=int, nargs='+', default=[0], help='seeds of Tables 7-8 (default 0)')
    parser.add_argument('--device', default='auto')
    parser.add_argument('--workers', type=int, default=None)
    parser.add_argument('--work-dir', default='./reproduction-runs', help='compare outputs and checkpoints (resumable)')
    parser.add_argument('--output', type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    start = time.perf_counter()
    t6 = run_experiment('table6', EMBEDDINGS, args.seeds, args)
    t7 = run_experiment('table7', [f'vit_small_stconv:conv_modules={n}' for n in CONV_MODULES], args.ablation_seeds, args)
    t8 = run_experiment('table8', [f'vit_small_stconv:cluster_iters={t}' for t in ITERS], args.ablation_seeds, args)
    cfg = t6['config']
    hw = hardware_info()
    device = t6['throughput']['device']
    page = f"""# Reproduction of paper 000, Tables 6-8 (scaled)

Generated by `python benchmarks/reproduce.py {' '.join(_cli_args(args))}` on {datetime.date.today()} in
{(time.perf_counter() - start) / 60:.0f} min. Hardware: {device}; torch {hw['torch']}, timm {hw['timm']}.
Dataset `{cfg.dataset}` at {cfg.img_size}×{cfg.img_size}; model kwargs for every model: {cfg.model_kwargs or 'none'}.
Table 6 over seeds {', '.join(map(str, args.seeds))} (mean ± std of the last epoch's top-1); Tables 7-8
over seeds {', '.join(map(str, args.ablation_seeds))}. Throughput: inference, batch {t6['throughput']['batch']},
{t6['throughput']['device']}, every model of a table timed side by side after training (median over seeds).
The paper's numbers are ImageNet-100 after 300 epochs on full ViT-S at 224×224: compare orderings
and trends, not values.

Recipe (`{args.config}`, after overrides):

```yaml
{recipe_to_yaml(cfg.recipe).strip()}
```

## Table 6: the three embeddings

{table_6(t6)}

## Table 7: conv modules before the super-token clustering (vit_small_stconv)

{table_7(t7)}

## Table 8: clustering iterations t (vit_small_stconv)

{table_8(t8)}
"""
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(page)
    print(page)
    print(f'wrote {args.output}')


def _cli_args(args: argparse.Namespace) -> List[str]:
    """The options that differ from the defaults, to print the command that regenerates the page."""
    out = []
    for name, default in (('config', QUICK_RECIPE), ('dataset', 'digits'), ('img_size', None), ('epochs', None),
                          ('seeds', [0, 1, 2]), ('ablation_seeds', [0])):
        value = getattr(args, name)
        if value != default:
            out.append(f'--{name.replace("_", "-")} ' + (' '.join(map(str, value)) if isinstance(value, list) else str(value)))
    return out


if __name__ == '__main__':
    torch.backends.cudnn.benchmark = True
    main()
