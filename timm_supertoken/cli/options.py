"""How every command is declared: `add_command`, the options several commands share, and the preamble they print.

An option that more than one command takes is declared here once, so it keeps one name and one meaning
across commands; each command passes only what differs (its default, what its output folder holds).
The options of a run's settings come from its config dataclass (`add_config_options`), whose fields hold
their defaults and help.
"""
import argparse
import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

from timm.utils import ParseKwargs

from .. import __version__
from ..config_fields import field_arguments
from ..data.image_sets import FASHION_MNIST_DIR
from ..runtime import hardware_info

__all__ = ['add_command', 'add_config_options', 'add_data_dir', 'add_img_size', 'add_model_kwargs', 'add_out',
           'add_resume', 'add_seed', 'add_threads', 'print_preamble']

Handler = Callable[[argparse.Namespace], int]


def add_command(subparsers: argparse._SubParsersAction, func: Handler) -> argparse.ArgumentParser:
    """Register handler `cmd_<name>` as subcommand <name>, documented by its docstring; `main` calls args.func(args).

    The docstring's first line is the command's line in `timm-supertoken --help`, the whole docstring its
    description in `timm-supertoken <name> --help`, so a command's documentation lives in one place.
    """
    doc = inspect.cleandoc(func.__doc__ or '')  # python -OO strips docstrings: no help text, still a command
    parser = subparsers.add_parser(func.__name__.removeprefix('cmd_'), help=doc.partition('\n')[0], description=doc)
    parser.set_defaults(func=func)
    return parser


def add_config_options(parser: argparse.ArgumentParser, config: type, names: Optional[Sequence[str]] = None,
                       none_means: Optional[Mapping[str, str]] = None, fallback_help: str = '') -> None:
    """An option per field of the config dataclass (`config_fields.field_arguments`), default and help its field's."""
    for flags, kwargs in field_arguments(config, names, none_means, fallback_help):
        parser.add_argument(*flags, **kwargs)


def add_data_dir(parser: argparse.ArgumentParser, otherwise: Optional[str] = None) -> None:
    """--data-dir: where Fashion-MNIST's idx files are, and `otherwise` what the folder is for the other datasets."""
    alternative = f' or {otherwise}' if otherwise else ''
    parser.add_argument('--data-dir', default=None,
                        help=f'Fashion-MNIST idx folder (default {FASHION_MNIST_DIR}){alternative}')


def add_img_size(parser: argparse.ArgumentParser, default: Optional[int], help: str) -> None:
    """--img-size: the side of the square images the models see."""
    parser.add_argument('--img-size', type=int, default=default, help=help)


def add_model_kwargs(parser: argparse.ArgumentParser, help: str, default: Optional[Dict[str, Any]] = None) -> None:
    """--model-kwargs key=value ...: timm.create_model keyword arguments, parsed as timm's train.py parses them."""
    parser.add_argument('--model-kwargs', nargs='*', default=default, action=ParseKwargs, help=help)


def add_out(parser: argparse.ArgumentParser, default: str, help: str) -> None:
    """--out: the folder a command writes into."""
    parser.add_argument('--out', default=default, help=f'{help} (default: %(default)s)')


def add_resume(parser: argparse.ArgumentParser) -> None:
    """--resume: the long-running commands checkpoint into --out and continue from there."""
    parser.add_argument('--resume', action='store_true', help='continue a killed run from its checkpoints in --out')


def add_seed(parser: argparse.ArgumentParser, default: Optional[int], help: str) -> None:
    """--seed: every random choice of the run."""
    parser.add_argument('--seed', type=int, default=default, help=help)


def add_threads(parser: argparse.ArgumentParser) -> None:
    """--threads, applied by `main` before the command runs, so every process of a torchrun launch gets it."""
    parser.add_argument('--threads', type=int, default=None,
                        help='torch CPU threads per process (default: torch\'s choice)')


def print_preamble(settings: Sequence[str] = ()) -> None:
    """Version, machine and settings before a command's numbers, which mean nothing without them."""
    print(f'timm-supertoken {__version__}')
    print(', '.join(f'{k}: {v}' for k, v in hardware_info().items()))
    for line in settings:
        print(line)
