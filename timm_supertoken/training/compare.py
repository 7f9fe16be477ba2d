"""The paper's experiment: train several embeddings under one recipe, then compare them as in Table 6 and Fig. 3.

Each model spec is a timm name with optional kwargs, `vit_small_stconv:conv_modules=4,cluster_iters=2`,
so Table 7's module-count ablation and Table 8's t sweep are the same command with other specs.
Every model trains in its own sub-folder of the output with its own resumable checkpoint; the
comparison table (CSV, JSON, Markdown) and the accuracy-per-epoch figure are rewritten after each
model, and throughput is timed for all models side by side once they are trained.
"""
import ast
import csv
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..config_fields import field_help
from ..models import MODEL_NAMES
from ..data.image_sets import DATASETS, FASHION_MNIST_DIR, ImageSet, load_splits
from ..harness import DEVICE_HELP, DistributedEnv, write_metrics
from ..harness import log as log_line
from ..runtime import cpu_name, hardware_info, headless_pyplot
from ..throughput import time_models
from .recipe import PAPER_RECIPE, Recipe, load_recipe, recipe_path
from .trainer import TrainConfig, autocast, create_training_model, fit, precision_name

__all__ = ['CompareConfig', 'build_compare_config', 'parse_model_spec', 'check_model_specs', 'quick_recipe_note',
           'run_compare',
           'class_count', 'model_train_config', 'results_markdown', 'time_side_by_side', 'QUICK_RECIPE', 'RESULTS_CSV',
           'RESULTS_JSON', 'FIGURE_NAME', 'FROM_RECIPE', 'RUN_OPTIONS', 'RECIPE_OPTIONS']

RESULTS_CSV = 'results.csv'
RESULTS_JSON = 'results.json'
FIGURE_NAME = 'accuracy_per_epoch.png'
THROUGHPUT_BATCH = 64
THROUGHPUT_BATCH_GPU = 128  # Table 2's batch size, and the GPU benchmark's
THROUGHPUT_REPEATS = 5
QUICK_RECIPE = 'quick_digits'  # the embedded default: scaled down to finish in minutes on 2 CPU cores


def parse_model_spec(spec: str) -> Tuple[str, Dict[str, Any]]:
    """'name' or 'name:key=value,key=value' -> (name, kwargs); values are Python literals, else strings."""
    name, _, rest = spec.partition(':')
    if not name:
        raise ValueError(f'model spec {spec!r} has no model name')
    kwargs: Dict[str, Any] = {}
    for item in filter(None, rest.split(',')):
        key, eq, value = item.partition('=')
        if not eq or not key.isidentifier():
            raise ValueError(f'model spec {spec!r}: expected key=value after the colon, got {item!r}')
        try:
            kwargs[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            kwargs[key] = value
    return name, kwargs


@dataclass
class CompareConfig:
    """Everything one comparison run needs; saved into results.json. `compare`'s options are its fields."""
    models: Sequence[str] = field(default=MODEL_NAMES, metadata=field_help(
        'timm names, each optionally with kwargs: vit_small_stconv:conv_modules=4,cluster_iters=2', metavar='SPEC'))
    model_kwargs: Dict[str, Any] = field(default_factory=dict, metadata=field_help(
        "create_model kwargs for every model, under each spec's own, e.g. depth=4 embed_dim=192"))
    dataset: str = field(default='digits', metadata=field_help('the labelled image set', choices=DATASETS))
    data_dir: Optional[str] = field(default=None, metadata=field_help(
        f"Fashion-MNIST's idx folder (default: {FASHION_MNIST_DIR}), or the folder with train/ and val/ of "
        "dataset 'folder'"))
    img_size: int = field(default=224, metadata=field_help('input side'))
    recipe: Recipe = field(default_factory=Recipe)
    seed: int = field(default=0, metadata=field_help('random seed of the whole run'))
    device: str = field(default='auto', metadata=field_help(DEVICE_HELP))
    workers: Optional[int] = field(default=None, metadata=field_help(
        'data-loader processes per rank (default: on a GPU, the cores per rank minus one; on a CPU 0)'))
    out: str = field(default='./timm-supertoken-compare', metadata=field_help(
        'output folder: the table, the figure and a checkpoint folder per model'))
    resume: bool = field(default=False, metadata=field_help('continue a killed run from its checkpoints in --out'))
    mean: Tuple[float, ...] = IMAGENET_DEFAULT_MEAN  # normalisation, and RandAugment's fill colour; train.py's --mean
    std: Tuple[float, ...] = IMAGENET_DEFAULT_STD


# the settings `build_compare_config` takes: CompareConfig's that a recipe file may set, with what None means,
# then the Recipe fields the command line may override (None: the recipe's value)
FROM_RECIPE = {'models': "the recipe's model, else the three embeddings", 'model_kwargs': "the recipe's",
               'img_size': "the recipe's", 'seed': "the recipe's, else 0"}
RUN_OPTIONS = ('models', 'model_kwargs', 'dataset', 'data_dir', 'img_size', 'seed', 'device', 'workers', 'out',
               'resume')
RECIPE_OPTIONS = ('epochs', 'batch_size', 'lr', 'weight_decay', 'warmup_epochs', 'mixup', 'cutmix', 'aa', 'reprob',
                  'smoothing', 'drop_path', 'sched', 'opt', 'model_ema')


def build_compare_config(config: str = QUICK_RECIPE, models: Optional[Sequence[str]] = None,
                         model_kwargs: Optional[Dict[str, Any]] = None, dataset: str = 'digits',
                         data_dir: Optional[str] = None, img_size: Optional[int] = None, seed: Optional[int] = None,
                         device: str = 'auto', workers: Optional[int] = None, out: str = './timm-supertoken-compare',
                         resume: bool = False, log: Callable[[str], None] = print,
                         **recipe_overrides: Any) -> CompareConfig:
    """The recipe file first, explicit values over it; the file's run keys (model, img_size, mean, ...) fill the rest.

    recipe_overrides are Recipe fields (train.py names); None values are ignored, and aa='none' turns
    RandAugment off. An `epochs` no longer than the recipe's warm-up scales the warm-up down unless
    `warmup_epochs` is given too (`Recipe.with_epochs`); log receives the note saying so.
    """
    recipe, run = load_recipe(recipe_path(config), base=PAPER_RECIPE)
    aa = recipe_overrides.get('aa')
    if isinstance(aa, str) and aa.lower() == 'none':
        recipe_overrides['aa'] = ''
    epochs = recipe_overrides.pop('epochs', None)
    if epochs is not None and recipe_overrides.get('warmup_epochs') is None:
        recipe, note = recipe.with_epochs(epochs)
        if note:
            log(note)
    else:
        recipe_overrides['epochs'] = epochs
    return CompareConfig(
        models=list(models or ([run['model']] if run.get('model') else MODEL_NAMES)),
        model_kwargs=dict(model_kwargs if model_kwargs is not None else run.get('model_kwargs') or {}),
        dataset=dataset,
        data_dir=data_dir or run.get('data_dir'),
        img_size=img_size or run.get('img_size') or 224,
        recipe=recipe.replace(**recipe_overrides),
        seed=seed if seed is not None else run.get('seed', 0),
        device=device,
        workers=workers,
        out=out,
        resume=resume,
        mean=tuple(run.get('mean') or IMAGENET_DEFAULT_MEAN),
        std=tuple(run.get('std') or IMAGENET_DEFAULT_STD),
    )


def quick_recipe_note(cfg: CompareConfig) -> str:
    """What the embedded default recipe changes from the paper, naming the run's actual data and trunk."""
    trunk = ', '.join(f'{k}={v}' for k, v in cfg.model_kwargs.items()) or 'full size'
    return (f'scaled down from the paper so the default run fits 2 CPU cores in minutes: trunk {trunk}; '
            f'{cfg.dataset} at {cfg.img_size}×{cfg.img_size}; fewer epochs and milder augmentation than Table 2. '
            'The paper-scale recipes are `timm-supertoken recipe` (imagenet100_*, fashion_mnist).')


def _folder_name(spec: str) -> str:
    """A file-system-safe sub-folder per model spec."""
    return re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec)


def class_count(train_set: ImageSet, val_set: ImageSet) -> int:
    """Classes of a labelled split: one more than the largest label in either part."""
    return int(max(train_set.labels.max(), val_set.labels.max())) + 1


def model_train_config(cfg: CompareConfig, name: str, kwargs: Dict[str, Any], num_classes: int) -> TrainConfig:
    """One model's training run in the comparison: its name and spec kwargs over the shared settings."""
    return TrainConfig(model=name, recipe=cfg.recipe, model_kwargs={**cfg.model_kwargs, **kwargs},
                       img_size=cfg.img_size, num_classes=num_classes, seed=cfg.seed, device=cfg.device,
                       workers=cfg.workers, mean=cfg.mean, std=cfg.std)


def check_model_specs(cfg: CompareConfig) -> List[Tuple[str, str, Dict[str, Any]]]:
    """(spec, timm name, kwargs) of every model, each first built on the meta device with the run's settings.

    A misspelt name or keyword is then an error before anything trains or prints, and costs no memory.
    """
    specs = [(spec, *parse_model_spec(spec)) for spec in cfg.models]
    if len({s for s, _, _ in specs}) != len(specs):
        raise ValueError(f'model specs must be distinct, got {list(cfg.models)}')
    unknown = [name for _, name, _ in specs if not timm.is_model(name)]
    if unknown:
        raise ValueError(f'unknown timm model {unknown[0]!r} (timm.list_models() lists the names)')
    with torch.device('meta'):
        for _, name, kwargs in specs:
            # any class count will do: it sizes the head, whatever the data turns out to hold
            create_training_model(model_train_config(cfg, name, kwargs, num_classes=2))
    return specs


def run_compare(cfg: CompareConfig, log: Callable[[str], None] = log_line,
                splits: Optional[Tuple[ImageSet, ImageSet]] = None,
                env: Optional[DistributedEnv] = None) -> Dict[str, Any]:
    """Train every spec with cfg.recipe, time them side by side, write the table and figure; returns results.json's dict.

    splits: (train, val) image sets to use instead of loading cfg.dataset. env: the processes to train on
    (default: the process group already joined, else this process on cfg.device).
    """
    specs = check_model_specs(cfg)
    train_set, val_set = splits or load_splits(cfg.dataset, cfg.data_dir, cfg.img_size, cfg.seed)
    env = env or DistributedEnv.current(cfg.device)
    device = env.device
    num_classes = class_count(train_set, val_set)
    out = Path(cfg.out)
    if env.is_primary:
        out.mkdir(parents=True, exist_ok=True)
        log(f'data: {cfg.dataset}, train {len(train_set):,} / val {len(val_set):,} images of '
            f'{tuple(train_set.images.shape[1:])}, {num_classes} classes, resized to {cfg.img_size}×{cfg.img_size}')

    train_cfgs = [model_train_config(cfg, name, kwargs, num_classes) for _, name, kwargs in specs]
    results: Dict[str, Any] = {'config': asdict(cfg), 'world_size': env.world,
                               'device': str(device), 'hardware': hardware_info(), 'models': {}}
    trained = {}
    for (spec, name, _), train_cfg in zip(specs, train_cfgs):
        t0 = time.perf_counter()
        run = fit(train_cfg, train_set, val_set, str(out / _folder_name(spec)), resume=cfg.resume,
                  dataset_name=cfg.dataset, log=log, env=env)
        history = run['history']
        trained[spec] = run['model'].eval()
        results['models'][spec] = {
            'model': name, 'model_kwargs': train_cfg.model_kwargs, 'params': run['params'],
            'embed_params': run['embed_params'], 'epochs': len(history), 'top1': history[-1]['top1'],
            'best_top1': max(r['top1'] for r in history), 'history': history,
            'train_time_s': sum(r['time_s'] for r in history), 'wall_s': time.perf_counter() - t0,
        }
        if env.is_primary:
            _write_outputs(out, results)

    if env.is_primary:
        timing, results['throughput'] = time_side_by_side(trained, cfg, device)
        for spec, stats in timing.items():
            results['models'][spec].update(img_per_s=stats['img_per_s'], throughput_ratio=stats['ratio'])
        _write_outputs(out, results)
    env.barrier()
    return results


def throughput_batch(device: torch.device) -> int:
    """The batch inference is timed at: the paper's training batch on a GPU, half of it on a CPU (minutes, not
    hours)."""
    return THROUGHPUT_BATCH_GPU if device.type == 'cuda' else THROUGHPUT_BATCH


def time_side_by_side(models: Dict[str, torch.nn.Module], cfg: CompareConfig, device: torch.device
                      ) -> Tuple[Dict[str, Dict[str, float]], Dict[str, Any]]:
    """Inference images/s of models timed interleaved on one batch, in the precision they train in, ratios to the
    first; and how they were timed (batch, size, device, precision), which a table of throughputs must name."""
    batch = throughput_batch(device)
    x = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(cfg.seed)).to(device)
    with autocast(device):
        timing = time_models(models, x, repeats=THROUGHPUT_REPEATS)
    return timing, {'batch': batch, 'img_size': cfg.img_size, 'device': _device_name(device),
                    'precision': precision_name(device), 'repeats': THROUGHPUT_REPEATS, 'baseline': next(iter(models))}


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model with the thread count: throughput means nothing without it."""
    if device.type == 'cuda':
        return torch.cuda.get_device_name(device)
    return f'{cpu_name()}, {torch.get_num_threads()} threads'


def results_markdown(results: Dict[str, Any]) -> str:
    """The comparison as a Markdown table in the layout of paper Table 6, plus throughput (its precision and batch named)."""
    tp = results.get('throughput')
    speed_column = f'img/s (inference, {tp["precision"]}, batch {tp["batch"]}) | ratio | ' if tp else ''
    lines = ['| model | params | embedding params | ' + speed_column
             + 'top-1 (last) | top-1 (best) | epochs |',
             '|---|---:|---:|' + ('---:|---:|' if tp else '') + '---:|---:|---:|']
    for spec, r in results['models'].items():
        speed = f'{r["img_per_s"]:.1f} | {r["throughput_ratio"]:.3f}× | ' if tp and 'img_per_s' in r else (
            '- | - | ' if tp else '')
        lines.append(f'| {spec} | {r["params"] / 1e6:.2f}M | {r["embed_params"]:,} | {speed}'
                     f'{r["top1"]:.2f} | {r["best_top1"]:.2f} | {r["epochs"]} |')
    if tp:
        lines.append(f'\nThroughput: {tp["device"]}, {tp["precision"]}, batch {tp["batch"]}, {tp["img_size"]}×{tp["img_size"]}, '
                     f'median of {tp["repeats"]} interleaved repeats; ratio to {tp["baseline"]}.')
    return '\n'.join(lines)


def _write_outputs(out: Path, results: Dict[str, Any]) -> None:
    """results.json, results.csv and the figure, rewritten after each model so a long run can be watched."""
    write_metrics(results, out / RESULTS_JSON)
    columns = ['model_spec', 'model', 'params', 'embed_params', 'img_per_s', 'throughput_ratio', 'top1', 'best_top1',
               'epochs', 'train_time_s']
    with open(out / RESULTS_CSV, 'w', newline='') as f:
        writer = csv.DictWriter(f, columns, extrasaction='ignore')
        writer.writeheader()
        for spec, r in results['models'].items():
            writer.writerow({'model_spec': spec, **r})
    plot_accuracy_curves(results, out / FIGURE_NAME)


def plot_accuracy_curves(results: Dict[str, Any], path: Path) -> None:
    """Paper Fig. 3: validation top-1 (a) and training loss (b) per epoch, one line per embedding."""
    plt = headless_pyplot()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100, layout='constrained')
    for spec, r in results['models'].items():
        epochs = [h['epoch'] for h in r['history']]
        acc_ax.plot(epochs, [h['top1'] for h in r['history']], marker='o', ms=3, label=spec)
        loss_ax.plot(epochs, [h['train_loss'] for h in r['history']], marker='o', ms=3, label=spec)
    acc_ax.set(xlabel='epoch', ylabel='validation top-1 (%)', title='(a) top-1 accuracy')
    loss_ax.set(xlabel='epoch', ylabel='training loss', title='(b) training loss')
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    cfg = results['config']
    fig.suptitle(f'{cfg["dataset"]} at {cfg["img_size"]}×{cfg["img_size"]}, one recipe for all (paper Fig. 3)')
    fig.savefig(path)
    plt.close(fig)
