"""Command-line options derived from a config dataclass's fields, so each default and help text lives in one place.

A field's `metadata['help']` says what it does (and, for a None default, what None means); the option's
type, default, choices and on/off form follow from its annotation, its default and `metadata['choices']`.
`field_arguments` returns the `ArgumentParser.add_argument` calls for the commands (`cli/options.py`) and
the benchmarks to make; `config_from_options` builds the dataclass back from the parsed values.
"""
import collections.abc
import dataclasses
import typing
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Type, TypeVar

from timm.utils import ParseKwargs

__all__ = ['field_help', 'field_arguments', 'config_from_options']

Config = TypeVar('Config')
Argument = Tuple[Tuple[str, ...], Dict[str, Any]]  # (flags, add_argument keyword arguments)


def field_help(help: str, choices: Optional[Sequence[Any]] = None, **metadata: Any) -> Dict[str, Any]:
    """A field's metadata: `field(default=..., metadata=field_help('what it does'))`."""
    return dict(metadata, help=help, **({'choices': tuple(choices)} if choices is not None else {}))


def _unwrap_optional(hint: Any) -> Any:
    """X for Optional[X], else the hint itself."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint


def _shown(value: Any) -> str:
    """A default as it is typed on the command line."""
    if isinstance(value, (tuple, list)):
        return ' '.join(_shown(v) for v in value)
    if isinstance(value, dict):
        return ' '.join(f'{k}={v}' for k, v in value.items()) or 'none'
    return f'{value:g}' if isinstance(value, float) else str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def field_arguments(cls: type, names: Optional[Sequence[str]] = None, none_means: Optional[Mapping[str, str]] = None,
                    fallback_help: str = '') -> List[Argument]:
    """One option per field of cls (those in names, in that order, else all), --name-with-dashes.

    none_means maps fields whose command-line default is None, instead of the field's, to what None
    then means. Booleans become switches: --no-x for a True default, --x for False, both for None.
    """
    none_means = none_means or {}
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    arguments: List[Argument] = []
    for name in names or list(fields):
        f, hint = fields[name], _unwrap_optional(hints[name])
        flag = '--' + name.replace('_', '-')
        default = None if name in none_means else _default(f)
        text = (f.metadata.get('help') or fallback_help).replace('%', '%%')
        if name in none_means:
            text += f' (default: {none_means[name]})'
        if hint is bool:
            if default is None:
                arguments.append(((flag,), dict(action='store_const', const=True, dest=name, help=text)))
                arguments.append((('--no-' + flag[2:],), dict(action='store_const', const=False, dest=name,
                                                              help=f'the opposite of {flag}')))
            elif default:
                arguments.append((('--no-' + flag[2:],), dict(action='store_false', dest=name,
                                                              help=f'turn off: {text} (on by default)')))
            else:
                arguments.append(((flag,), dict(action='store_true', help=text)))
            continue
        kwargs: Dict[str, Any] = dict(default=default)
        origin = typing.get_origin(hint)
        if origin is dict:
            kwargs.update(nargs='*', action=ParseKwargs, metavar='KEY=VALUE')
        elif origin is tuple:
            items = typing.get_args(hint)
            kwargs.update(type=items[0], nargs='+' if Ellipsis in items else len(items))
        elif origin in (list, collections.abc.Sequence):
            kwargs.update(type=typing.get_args(hint)[0], nargs='+')
        else:
            kwargs['type'] = hint
        if 'choices' in f.metadata:
            kwargs['choices'] = f.metadata['choices']
        if 'metavar' in f.metadata:
            kwargs['metavar'] = f.metadata['metavar']
        if default is not None and name not in none_means:
            text += f' (default: {_shown(default)})'
        arguments.append(((flag,), dict(kwargs, help=text)))
    return arguments


def config_from_options(cls: Type[Config], values: Mapping[str, Any], **overrides: Any) -> Config:
    """cls built from the parsed options that name its fields (sequences as the field's tuple), overrides on top."""
    hints = typing.get_type_hints(cls)
    chosen = {}
    for f in dataclasses.fields(cls):
        if f.name in values:
            value = values[f.name]
            if typing.get_origin(_unwrap_optional(hints[f.name])) is tuple and value is not None:
                value = tuple(value)
            chosen[f.name] = value
    return cls(**dict(chosen, **overrides))
