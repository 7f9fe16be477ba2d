"""Scaled replication of Tables 6-8 of *Lightweight ViT Convolutional Embedding Module Based on Super-Token Clustering*
with `timm-supertoken compare`, written to results/reproduce.json and docs/benchmarks.md.

    python benchmarks/reproduce.py                       # quick_digits on CPU, 3 seeds
    python benchmarks/reproduce.py --config fashion_mnist --dataset fashion-mnist --seeds 0 --epochs 100  # GPU

Three experiments, each one `compare` run per seed under a single recipe:
- Table 6: the three embeddings (top-1 mean ± std over seeds, parameters, throughput);
- Table 7: vit_small_stconv with 0, 1, 2, 4, 6 conv modules and 6 + an extra conv (`conv_modules=7`);
- Table 8: vit_small_stconv with t = 1..4 clustering iterations, with throughput.
Every model of one experiment is timed side by side in the same process after training. `--tables` picks
the experiments; `--speed-only` times an ablation's models untrained instead (throughput does not depend on
the weights), which is how Table 8's throughput side fits beside Table 6 in a GPU budget:

    python benchmarks/reproduce.py --config fashion_mnist --dataset fashion-mnist --seeds 0 --epochs 10 \
        --tables 6 8 --speed-only 8                                    # one GPU

The result holds the settings, the device and the tables, with the paper's numbers beside ours;
docs/reproduction.md reads them. Runs resume from --work-dir.
"""
import argparse
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Union

import torch

from timm_supertoken.data.image_sets import load_splits
from timm_supertoken.models.parameters import parameter_counts
from timm_supertoken.harness import DistributedEnv
from timm_supertoken.runtime import use_cudnn_benchmark
from timm_supertoken.training.compare import (QUICK_RECIPE, build_compare_config, class_count, model_train_config,
                                              parse_model_spec, run_compare, time_side_by_side)
from timm_supertoken.training.trainer import create_training_model

from docs_page import PAGE, RESULTS_DIR, Table, render_section, result_record, write_result

EMBEDDINGS = ('vit_small_patch', 'vit_small_convembed', 'vit_small_stconv')
# the paper's ImageNet-100 top-1 after 300 epochs (Table 6), per conv-module count (Table 7), per t (Table 8)
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


def time_experiment(name: str, specs: Sequence[str], args: argparse.Namespace) -> Dict[str, Any]:
    """The specs built untrained and timed side by side as `compare` times trained ones: the throughput column of
    an ablation without its training runs."""
    cfg = build_compare_config(args.config, models=specs, dataset=args.dataset, data_dir=args.data_dir,
                               img_size=args.img_size, seed=args.ablation_seeds[0], device=args.device,
                               workers=args.workers, out=str(Path(args.work_dir) / name), epochs=args.epochs)
    device = DistributedEnv.current(cfg.device).device
    num_classes = class_count(*load_splits(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.seed))
    models = {spec: create_training_model(model_train_config(cfg, *parse_model_spec(spec), num_classes))
              .to(device).eval() for spec in specs}
    timing, throughput = time_side_by_side(models, cfg, device)
    per_spec = {spec: [dict(zip(('embed_params', 'params'), parameter_counts(model)),
                            img_per_s=timing[spec]['img_per_s'], throughput_ratio=timing[spec]['ratio'])]
                for spec, model in models.items()}
    print(f'{name} (untrained): ' + ', '.join(f'{s} {t["img_per_s"]:.0f} img/s' for s, t in timing.items()), flush=True)
    return {'per_spec': per_spec, 'config': cfg, 'throughput': throughput}


def _top1(runs: List[Dict[str, Any]]) -> Optional[Union[float, str]]:
    """The last-epoch top-1 (mean ± std over seeds when there are several); None for untrained models."""
    if 'top1' not in runs[0]:
        return None
    values = [r['top1'] for r in runs]
    return values[0] if len(values) == 1 else f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def _speed(runs: List[Dict[str, Any]]) -> List[float]:
    """Median over seeds of the inference throughput and of its ratio to the experiment's first model."""
    return [statistics.median(r['img_per_s'] for r in runs), statistics.median(r['throughput_ratio'] for r in runs)]


def _model_table(exp: Dict[str, Any], first_column: str, labels: Sequence[str], paper: Sequence[float]) -> Table:
    """One row per spec: label, parameters, throughput, our top-1, the paper's top-1."""
    rows = [[label, f'{runs[0]["params"] / 1e6:.2f}M', runs[0]['embed_params'], *_speed(runs), _top1(runs), theirs]
            for runs, label, theirs in zip(exp['per_spec'].values(), labels, paper)]
    return Table([first_column, 'params', 'embedding params', 'img/s', 'ratio', 'top-1 (ours)', 'top-1 (paper)'], rows,
                 [None, None, '{:,}', '{:.0f}', '{:.3f}×', '{:.2f}', '{:.2f}'])


def table_6(exp: Dict[str, Any]) -> Table:
    """The three embeddings, ours beside the paper's (ImageNet-100)."""
    return _model_table(exp, 'embedding', EMBEDDINGS, [PAPER_TABLE_6[m] for m in EMBEDDINGS])


def table_7(exp: Dict[str, Any]) -> Table:
    """Conv modules before the clustering, ours beside the paper's."""
    labels = [{0: 'none (clustering only)', 1: '1', 7: '1-6 + additional conv'}.get(n, f'1-{n}') for n in CONV_MODULES]
    return _model_table(exp, 'conv modules', labels, [PAPER_TABLE_7[n] for n in CONV_MODULES])


def table_8(exp: Dict[str, Any]) -> Table:
    """Clustering iterations t, with throughput, ours beside the paper's."""
    rows = [[t, *_speed(runs), _top1(runs), *PAPER_TABLE_8[t]] for runs, t in zip(exp['per_spec'].values(), ITERS)]
    return Table(['t', 'img/s (ours)', 'ratio to t=1', 'top-1 (ours)', 'img/s (paper, RTX 3060 Ti)', 'top-1 (paper)'],
                 rows, [None, '{:.0f}', '{:.3f}×', '{:.2f}', None, '{:.2f}'])


class PaperTable(NamedTuple):
    """One of the paper's tables: the model specs its experiment trains, its heading, and how its results tabulate."""
    specs: Sequence[str]
    heading: str
    tabulate: Callable[[Dict[str, Any]], Table]


TABLES = {
    6: PaperTable(EMBEDDINGS, 'the three embeddings', table_6),
    7: PaperTable([f'vit_small_stconv:conv_modules={n}' for n in CONV_MODULES],
                  'conv modules before the super-token clustering (vit_small_stconv)', table_7),
    8: PaperTable([f'vit_small_stconv:cluster_iters={t}' for t in ITERS], 'clustering iterations t (vit_small_stconv)',
                  table_8),
}


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
    parser.add_argument('--results-dir', type=Path, default=RESULTS_DIR, help='where the result file goes')
    parser.add_argument('--page', type=Path, default=PAGE, help='the page rendered from every result file')
    parser.add_argument('--tables', type=int, nargs='+', choices=sorted(TABLES), default=sorted(TABLES),
                        help='experiments to run (default 6 7 8)')
    parser.add_argument('--speed-only', type=int, nargs='+', choices=(7, 8), default=[],
                        help='ablations whose models are timed untrained instead of trained (their top-1 is not '
                             'measured): Table 8\'s throughput beside Table 6 in a GPU budget')
    args = parser.parse_args()
    if not set(args.speed_only) <= set(args.tables):
        parser.error(f'--speed-only {args.speed_only} names tables that --tables {args.tables} does not run')

    experiments = {}
    for table in sorted(args.tables):
        specs = TABLES[table].specs
        if table in args.speed_only:
            experiments[table] = time_experiment(f'table{table}', specs, args)
        else:
            seeds = args.seeds if table == 6 else args.ablation_seeds
            experiments[table] = run_experiment(f'table{table}', specs, seeds, args)
    record = reproduce_record(experiments, args, ' '.join(['python benchmarks/reproduce.py', *_cli_args(args, parser)]))
    path = write_result(record, args.results_dir, args.page)
    print(render_section(record))
    print(f'wrote {path} and {args.page}')


def reproduce_record(experiments: Dict[int, Dict[str, Any]], args: argparse.Namespace, command: str) -> Dict[str, Any]:
    """The result: settings, the device, and the tables that ran, each with the paper's numbers beside ours."""
    first = experiments[min(experiments)]
    cfg, tp = first['config'], first['throughput']
    train_min = sum(r.get('train_time_s', 0.0) for exp in experiments.values() for runs in exp['per_spec'].values()
                    for r in runs) / 60
    untrained = [t for t in experiments if t in args.speed_only]
    setting = [
        f'Recipe `{args.config}` on `{cfg.dataset}` at {cfg.img_size}×{cfg.img_size}; model kwargs for every model: '
        f'{cfg.model_kwargs or "none"}; {train_min:.0f} min of training in all on {tp["device"]}.'
        f'{_seeds_note(experiments, untrained, args)}',
        f'Throughput: inference in {tp["precision"]}, batch {tp["batch"]}, the models of one table timed side by side '
        f'after training (median over seeds); the ratio is to the table\'s first row.{_untrained_note(untrained)}',
    ]
    tables = []
    for t, exp in experiments.items():
        table = TABLES[t].tabulate(exp)
        table.title = f'Table {t}, {TABLES[t].heading}:'
        tables.append(table)
    return result_record('reproduce', 'Paper Tables 6-8', tables, setting, command=command)


def _seeds_note(experiments: Dict[int, Dict[str, Any]], untrained: Sequence[int], args: argparse.Namespace) -> str:
    """The seeds of the tables that trained."""
    notes = []
    if 6 in experiments:
        notes.append(f"Table 6: seeds {', '.join(map(str, args.seeds))}, mean ± std of the last epoch's top-1")
    ablations = [str(t) for t in experiments if t != 6 and t not in untrained]
    if ablations:
        notes.append(f"Table {' and '.join(ablations)}: seed {', '.join(map(str, args.ablation_seeds))}")
    return ''.join(f' {note}.' for note in notes)


def _untrained_note(tables: Sequence[int]) -> str:
    if not tables:
        return ''
    names = ' and '.join(f'Table {t}' for t in tables)
    return f' {names}: timed untrained (`--speed-only`), so no top-1; throughput does not depend on the weights.'


def _cli_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> List[str]:
    """The experiment options that differ from the parser's defaults, to print the command that regenerates the page."""
    out = []
    for name in ('config', 'dataset', 'img_size', 'epochs', 'seeds', 'ablation_seeds', 'tables', 'speed_only'):
        value = getattr(args, name)
        if value != parser.get_default(name):
            out.append(f'--{name.replace("_", "-")} ' + (' '.join(map(str, value)) if isinstance(value, list) else str(value)))
    return out


if __name__ == '__main__':
    use_cudnn_benchmark()
    main()
