"""The `timm-supertoken` command.

`timm-supertoken compare` is the paper's experiment: the three embeddings trained under one recipe
and compared (Table 6, Fig. 3). `timm-supertoken` alone (or `info`) shows what the package adds to
timm: the parameter counts beside the paper's Table 1, CPU inference throughput beside timm's
`vit_small_patch16_224`, and super-token clustering on a real photo (Fig. 2).

Each module of this package is one group of subcommands: a handler `cmd_<name>(args)` per command,
whose docstring is the command's help, and an `add_commands(subparsers)` that registers them and
declares their options (those that several commands share come from `options`). The library code
they call lives outside `cli/`.
"""
import argparse
import sys
from typing import List, Optional

import torch

from .. import __version__
from ..runtime import use_cudnn_benchmark
from . import clustering, data, hub, info, training

__all__ = ['main', 'build_parser']

# in `--help` order
COMMAND_GROUPS = (info, training, data, hub, clustering)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; each subcommand sets `func`."""
    parser = argparse.ArgumentParser(
        prog='timm-supertoken', description='Super-token convolutional embeddings for timm ViTs.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    for group in COMMAND_GROUPS:
        group.add_commands(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `timm-supertoken` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    # a bare command, or options without a subcommand, mean `info`
    if not argv or (argv[0].startswith('-') and argv[0] not in ('-h', '--help', '--version')):
        argv.insert(0, 'info')
    args = parser.parse_args(argv)
    if getattr(args, 'threads', None) is not None:  # options.add_threads
        torch.set_num_threads(args.threads)
    use_cudnn_benchmark()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        # bad input or data: one line naming the problem, not a traceback
        raise SystemExit(f'timm-supertoken {args.command}: error: {e}') from e
