"""The `timm-supertoken` command.

`timm-supertoken compare` is the paper's experiment: the three embeddings trained under one recipe
and compared (Table 6, Fig. 3). `timm-supertoken` alone (or `info`) shows what the package adds to
timm: the parameter counts beside the paper's Table 1, CPU inference throughput beside timm's
`vit_small_patch16_224`, and super-token clustering on a real photo (Fig. 2).

Each module of this package is one group of subcommands: a handler `cmd_<name>(args)` per command,
whose docstring is the command's help, and an `add_commands(subparsers)` that registers them and
declares their options (those that several commands share come from `options`). The library code
they call lives outside `cli/`. `COMMANDS` maps each command to its module and the extra it needs, so
that the core install runs `export` and `push`, and any other command names the extra it lacks.
"""
import argparse
import importlib
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .. import __version__
from .._extras import MissingExtraError, missing_from_extra, require_extra
from ..runtime import use_cudnn_benchmark

__all__ = ['COMMANDS', 'main', 'build_parser']

# every command, in `--help` order: the module of this package that defines it, and the extra it needs beyond
# the core install (None: none). A module is imported only when one of its commands runs or `--help` lists it.
COMMANDS: Dict[str, Tuple[str, Optional[str]]] = {
    'info': ('info', 'train'),  # its figure: matplotlib, and scikit-learn's photo
    'compare': ('training', 'train'),
    'recipe': ('training', 'train'),
    'dataset': ('data', 'train'),  # digits come from scikit-learn
    'imagenet100': ('data', None),
    'export': ('hub', None),
    'push': ('hub', None),
    'cluster': ('clustering', 'cluster'),
}


def _installed(command: str) -> bool:
    extra = COMMANDS[command][1]
    return extra is None or not missing_from_extra(extra)


def build_parser(commands: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The argument parser of `commands` (default: all); each subcommand sets `func`.

    A command whose extra is not installed is listed with the extra it needs, and its module is not imported.
    """
    parser = argparse.ArgumentParser(
        prog='timm-supertoken', description='Super-token convolutional embeddings for timm ViTs.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    subparsers = parser.add_subparsers(dest='command', metavar='COMMAND')
    wanted = list(COMMANDS if commands is None else commands)
    for module in dict.fromkeys(COMMANDS[name][0] for name in wanted):
        names = [name for name in wanted if COMMANDS[name][0] == module]
        if any(_installed(name) for name in names):
            importlib.import_module(f'{__name__}.{module}').add_commands(subparsers)
        else:
            for name in names:
                subparsers.add_parser(name, help=f'(needs the [{COMMANDS[name][1]}] extra)')
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point of the `timm-supertoken` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # a bare command, or options without a subcommand, mean `info`
    if not argv or (argv[0].startswith('-') and argv[0] not in ('-h', '--help', '--version')):
        argv.insert(0, 'info')
    command = argv[0]
    extra = COMMANDS.get(command, (None, None))[1]
    if extra is not None:
        try:
            require_extra(extra, f'timm-supertoken {command}')
        except MissingExtraError as e:
            raise SystemExit(str(e)) from None
    # the module of the command that runs; every module for --help, --version or a misspelt command
    args = build_parser([command] if command in COMMANDS else None).parse_args(argv)
    if getattr(args, 'threads', None) is not None:  # options.add_threads
        torch.set_num_threads(args.threads)
    use_cudnn_benchmark()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, FloatingPointError) as e:
        # bad input or data: one line naming the problem, not a traceback
        raise SystemExit(f'timm-supertoken {args.command}: error: {e}') from e
