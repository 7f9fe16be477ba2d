"""The `timm-supertoken` command.

`timm-supertoken compare` is the paper's experiment: the three embeddings trained under one recipe
and compared (Table 6, Fig. 3). `timm-supertoken` alone (or `info`) shows what the package adds to
timm: the parameter counts beside the paper's Table 1, CPU inference throughput beside timm's
`vit_small_patch16_224`, and super-token clustering on a real photo (Fig. 2). The other
subcommands (recipe, dataset, imagenet100, export, push, cluster) plug into `build_parser`.
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

import timm

from . import __version__
from .models import MODEL_NAMES
from .clustering.cli import add_cluster_command
from .data.image_folder import add_dataset_command
from .data.imagenet100 import add_imagenet100_command
from .hub_cli import add_hub_commands
from .functional import super_token_affinities, super_token_aggregate
from .runtime import hardware_info, headless_pyplot
from .throughput import BASELINE, benchmark_cpu, throughput_markdown
from .training.cli import add_training_commands

__all__ = ['main', 'build_parser', 'parameter_rows', 'parameter_markdown', 'plot_super_tokens']

# The paper's Table 1 (embedding parameters) and Tables 6-7 (whole-model totals, ImageNet-100, 100 classes)
PAPER_EMBED_PARAMS = {'vit_small_patch': '0.30M', 'vit_small_convembed': '1.00M', 'vit_small_stconv': '0.09M'}
PAPER_TOTAL_PARAMS = {'vit_small_patch': '18M', 'vit_small_convembed': '20M', 'vit_small_stconv': '17M / 17.9M'}
PAPER_NUM_CLASSES = 100

FIGURE_SIZE_IN = (15.0, 5.4)
FIGURE_DPI = 100


def parameter_rows(model_names: Sequence[str] = (BASELINE,) + MODEL_NAMES) -> List[Dict[str, object]]:
    """Embedding and total parameter counts, built on the meta device so no weights are allocated."""
    rows = []
    for name in model_names:
        with torch.device('meta'):
            default = timm.create_model(name)
            paper = timm.create_model(name, mlp_ratio=3, num_classes=PAPER_NUM_CLASSES)
        rows.append({
            'model': name,
            'embed': sum(p.numel() for p in default.patch_embed.parameters()),
            'paper_embed': PAPER_EMBED_PARAMS.get(name, '-'),
            'total': sum(p.numel() for p in default.parameters()),
            'total_paper_cfg': sum(p.numel() for p in paper.parameters()),
            'paper_total': PAPER_TOTAL_PARAMS.get(name, '-'),
        })
    return rows


def parameter_markdown(rows: List[Dict[str, object]]) -> str:
    """The parameter table as Markdown."""
    lines = [
        '| model | embedding params | paper Table 1 | total (mlp_ratio=4, 1000 classes) '
        f'| total (mlp_ratio=3, {PAPER_NUM_CLASSES} classes) | paper Tables 6/7 |',
        '|---|---:|---:|---:|---:|---:|',
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['embed']:,} | {r['paper_embed']} | {r['total']:,} "
            f"| {r['total_paper_cfg']:,} ({r['total_paper_cfg'] / 1e6:.1f}M) | {r['paper_total']} |")
    return '\n'.join(lines)


def _load_photo(img_size: int) -> np.ndarray:
    """scikit-learn's bundled 'china.jpg' (427×640), centre-cropped square and resized: (S, S, 3) in [0, 1]."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photo = load_sample_image('china.jpg')
    h, w = photo.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    crop = Image.fromarray(photo[top:top + side, left:left + side])
    return np.asarray(crop.resize((img_size, img_size), Image.BICUBIC), dtype=np.float32) / 255.


def _token_labels(affinity: torch.Tensor, grid: int) -> np.ndarray:
    """Per-pixel index of the arg-max super token, from affinities (1, h, w, grid², 9) -> (h·grid, w·grid)."""
    _, h, w, _, _ = affinity.shape
    k = affinity[0].argmax(-1)  # (h, w, P): which of the 3×3 neighbours won
    rows = torch.arange(h).view(h, 1, 1) + k // 3 - 1
    cols = torch.arange(w).view(1, w, 1) + k % 3 - 1
    labels = (rows * w + cols).view(h, w, grid, grid).permute(0, 2, 1, 3).reshape(h * grid, w * grid)
    return labels.numpy()


def super_token_panel_titles(img_size: int, patch: int, iters: int, grid: Tuple[int, int]) -> Tuple[str, ...]:
    """Titles of the three panels, saying which sizes count pixels and which count super tokens."""
    return (f'input {img_size}×{img_size} px, S⁰ = mean of each {patch}×{patch}-px cell',
            f'arg-max super token of each pixel after t={iters}',
            f'each pixel painted with its super token ({grid[0]}×{grid[1]} tokens)')


def plot_super_tokens(out_dir: Path, img_size: int = 224, patch: int = 16, iters: int = 3) -> Path:
    """Paper Fig. 2 on a real photo: super tokens of the image's own pixels, one per 16×16 cell (14×14 at 224).

    Clustering runs on ImageNet-normalised RGB pixels, so the picture needs no trained weights; the
    model does the same on 28×28 learned stem features with a 2×2 grid.
    """
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    plt = headless_pyplot()
    photo = _load_photo(img_size)
    x = torch.from_numpy((photo - np.array(IMAGENET_DEFAULT_MEAN, dtype=np.float32))
                         / np.array(IMAGENET_DEFAULT_STD, dtype=np.float32))
    x = x.permute(2, 0, 1).unsqueeze(0)
    affinity, norm = super_token_affinities(x, patch, iters)
    tokens = super_token_aggregate(x, affinity, norm, patch)[0].permute(1, 2, 0).numpy()  # (h, w, 3)
    labels = _token_labels(affinity, patch)[:img_size, :img_size]

    # each pixel painted with the value of its super token (what the ViT receives), de-normalised
    token_colour = tokens.reshape(-1, 3) * np.array(IMAGENET_DEFAULT_STD) + np.array(IMAGENET_DEFAULT_MEAN)
    painted = np.clip(token_colour[labels], 0., 1.)
    edges = np.zeros(labels.shape, dtype=bool)
    edges[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edges[1:, :] |= labels[1:, :] != labels[:-1, :]
    outlined = photo.copy()
    outlined[edges] = (1.0, 0.9, 0.0)

    fig, axes = plt.subplots(1, 3, figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout='constrained')
    axes[0].imshow(photo)
    for t in range(patch, img_size, patch):
        axes[0].axhline(t - 0.5, color='w', lw=0.6)
        axes[0].axvline(t - 0.5, color='w', lw=0.6)
    titles = super_token_panel_titles(img_size, patch, iters, tokens.shape[:2])
    axes[1].imshow(outlined)
    axes[2].imshow(painted, interpolation='nearest')
    for ax, title in zip(axes, titles):
        ax.set_title(title)
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle('Super-token clustering (paper Fig. 2) on the photo\'s own RGB pixels, no trained weights '
                 '- sklearn china.jpg')
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / 'super_tokens.png'
    fig.savefig(path)
    plt.close(fig)
    return path


def cmd_info(args: argparse.Namespace) -> int:
    """Parameters, CPU throughput and the clustering figure, in one run."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f'timm-supertoken {__version__}')
    print(', '.join(f'{k}: {v}' for k, v in hardware_info().items()))

    rows = parameter_rows()
    with torch.device('meta'):
        five = timm.create_model('vit_small_stconv', conv_modules=5).patch_embed
    print(f'\nParameters (embedding = model.patch_embed). Paper Table 1\'s 0.09M for the proposed embedding '
          f'matches five conv modules (conv_modules=5: {sum(p.numel() for p in five.parameters()):,});\n'
          f'its Table 5 lists six, our default. Paper totals are for ImageNet-100 (100 classes) with mlp_ratio=3.')
    print(parameter_markdown(rows))

    if not args.no_bench:
        print(f'\nCPU inference, fp32, batch {args.batch_size}, {args.img_size}×{args.img_size}, '
              f'median of {args.repeats} interleaved repeats')
        results = benchmark_cpu(batch_size=args.batch_size, img_size=args.img_size, repeats=args.repeats)
        print(throughput_markdown(results))

    if not args.no_plot:
        path = plot_super_tokens(Path(args.out), img_size=args.img_size)
        print(f'\nwrote {path}')
    print(f'\ndone in {time.perf_counter() - start:.1f} s')
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets `func`."""
    parser = argparse.ArgumentParser(
        prog='timm-supertoken', description='Super-token convolutional embeddings for timm ViTs.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')

    info = sub.add_parser('info', help='parameter table, CPU throughput, clustering figure (default)')
    info.add_argument('--batch-size', type=int, default=8, help='benchmark batch size (default 8)')
    info.add_argument('--repeats', type=int, default=5, help='interleaved timing repeats, median taken (default 5)')
    info.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    info.add_argument('--img-size', type=int, default=224, help='image side for benchmark and figure (default 224)')
    info.add_argument('--out', default='./timm-supertoken-out', help='folder for the figure')
    info.add_argument('--no-bench', action='store_true', help='skip the throughput measurement')
    info.add_argument('--no-plot', action='store_true', help='skip the figure')
    info.set_defaults(func=cmd_info)
    add_training_commands(sub)
    add_dataset_command(sub)
    add_imagenet100_command(sub)
    add_hub_commands(sub)
    add_cluster_command(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `timm-supertoken` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # a bare command, or options without a subcommand, mean `info`
    if not argv or (argv[0].startswith('-') and argv[0] not in ('-h', '--help', '--version')):
        argv.insert(0, 'info')
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        # bad input or data: one line naming the problem, not a traceback
        raise SystemExit(f'timm-supertoken {args.command}: error: {e}') from e


if __name__ == '__main__':
    sys.exit(main())
