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
from typing import List, Optional

import torch

from . import __version__
from .clustering.cli import add_cluster_command
from .data.image_folder import add_dataset_command
from .data.imagenet100 import add_imagenet100_command
from .figures import plot_super_tokens
from .hub_cli import add_hub_commands
from .models.parameters import count_parameters, paper_parameter_markdown, parameter_rows
from .runtime import hardware_info
from .throughput import BENCH_MODELS, benchmark_cpu, throughput_markdown
from .training.cli import add_training_commands

__all__ = ['main', 'build_parser']


def cmd_info(args: argparse.Namespace) -> int:
    """Parameters, CPU throughput and the clustering figure, in one run."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    print(f'timm-supertoken {__version__}')
    print(', '.join(f'{k}: {v}' for k, v in hardware_info().items()))

    five_modules, _ = count_parameters('vit_small_stconv', conv_modules=5)
    print(f'\nParameters (embedding = model.patch_embed). Paper Table 1\'s 0.09M for the proposed embedding '
          f'matches five conv modules (conv_modules=5: {five_modules:,});\n'
          f'its Table 5 lists six, our default. Paper totals are for ImageNet-100 (100 classes) with mlp_ratio=3.')
    print(paper_parameter_markdown(parameter_rows(BENCH_MODELS)))

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
