"""Options declared once, as dataclass fields, for the command line and the Python API.

A field made with `opt(default, help, **argparse_kw)` is a `--name-with-dashes` option of its
command (`add_option_arguments`), a keyword argument of the Python function that runs it
(`options_from_kwargs`, `options_signature`), and what the code behind both reads. Metadata
`cli=False` keeps a field out of the command line (in-memory objects: a loaded model, a
tokenizer); `type=` overrides the argparse type read from the annotation.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import numbers
import os
import typing
from dataclasses import field
from typing import Any, TypeVar

from featurescribe.errors import BadOption

T = TypeVar("T")


def opt(default: Any, help: str, **argparse_kw: Any) -> Any:
    """A dataclass field that is also a command-line option (`--name-with-dashes`)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


def required(help: str, **argparse_kw: Any) -> Any:
    """A field without a default: a required option (and keyword argument)."""
    return field(metadata={"help": help, "required": True, **argparse_kw})


class _Registered(dict):
    """What a `{explainers}`-style placeholder of a help text reads as in a docstring."""

    def __missing__(self, key: str) -> str:
        return f"the registered {key} (see the command's --help)"


def options_class(cls: type[T]) -> type[T]:
    """Class decorator of an options declaration: a frozen dataclass, documented (below)."""
    return documented(dataclasses.dataclass(frozen=True)(cls))


def documented(cls: type[T]) -> type[T]:
    """The docstring gains an `Attributes:` section made from the fields' help
    texts, so `help()` and the API reference list every option with its default."""
    lines = [(cls.__doc__ or "").rstrip(), "", "Attributes:"]
    for f in dataclasses.fields(cls):
        text = " ".join(f.metadata["help"].format_map(_Registered()).replace("%%", "%").split())
        if f.metadata.get("required"):
            text += " (required)"
        elif "default" not in text:
            text += f" (default {f.default!r})"
        lines.append(f"    {f.name}: {text}" + ("" if _on_cli(f) else " (Python only)"))
    cls.__doc__ = "\n".join(lines).lstrip("\n")
    return cls


def _on_cli(f: dataclasses.Field) -> bool:
    return f.metadata.get("cli", True)


def _scalar(hint: Any) -> type:
    """int for `int` and `int | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


def add_option_arguments(parser: argparse.ArgumentParser, cls: type, help_names: dict[str, str] | None = None) -> None:
    """One option per command-line field of the dataclass `cls` (booleans are flags)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for f in filter(_on_cli, dataclasses.fields(cls)):
        kw = {k: v for k, v in f.metadata.items() if k != "cli"}
        kw["help"] = kw["help"].format(**(help_names or {}))
        group = kw.pop("group", None)
        target = parser if group is None else groups.setdefault(group, parser.add_argument_group(group))
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] is bool:
            target.add_argument(flag, action="store_true", **kw)
            continue
        if not kw.get("required"):
            kw["default"] = f.default
        kw.setdefault("type", _scalar(hints[f.name]))
        target.add_argument(flag, **kw)


def options_from_args(cls: type[T], args: argparse.Namespace, **extra: Any) -> T:
    """The dataclass `cls` from parsed arguments (fields the parser lacks keep their defaults)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{n: getattr(args, n) for n in names if hasattr(args, n)}, **extra)


def options_from_kwargs(cls: type[T], what: str, kwargs: dict[str, Any]) -> T:
    """The dataclass `cls` from a Python call's keyword arguments; BadOption for a name it lacks
    or a required one left out."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - set(fields))
    if unknown:
        raise BadOption(f"{what}() got an unknown option {unknown[0]!r}; its options are: {', '.join(fields)}")
    missing = [n for n, f in fields.items() if f.metadata.get("required") and n not in kwargs]
    if missing:
        raise BadOption(f"{what}() needs {missing[0]}=...")
    hints = typing.get_type_hints(cls)
    return cls(**{n: checked_value(f"{what}() option {n}=", v, hints[n]) for n, v in kwargs.items()})


_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "True or False"}
SEED_MAX = 2**63 - 1  # torch's generators and DuckDB's hash take a signed 64-bit seed


def check_seed(value: int, name: str = "--seed") -> int:
    """BadOption for a seed that is not a whole number from 0 to SEED_MAX (the same range for
    every command and function that takes one)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= value <= SEED_MAX:
        raise BadOption(f"{name} must be a whole number from 0 to {SEED_MAX}, not {value!r}")
    return int(value)


def checked_value(what: str, value: Any, hint: Any) -> Any:
    """`value` as the str, int, float or bool its type hint names (a path or a number as its
    string, a numpy integer as an int); BadOption for a value of another type. Other hints pass
    it through."""
    kind = _scalar(hint)
    if kind not in _KINDS or (value is None and kind is not hint):
        return value
    if kind is str and isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    if kind is str and isinstance(value, numbers.Real) and not isinstance(value, bool):  # layer=6, threshold=0.2
        return str(int(value)) if isinstance(value, numbers.Integral) else str(float(value))
    if kind is bool and isinstance(value, bool):
        return value
    if kind in (int, float) and not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return kind(value)
        if kind is float and isinstance(value, numbers.Real):
            return float(value)
    raise BadOption(f"{what} must be {_KINDS[kind]}, not {value!r}")


def options_signature(cls: type, *, after: dict[str, type] | None = None, **leading: type) -> inspect.Signature:
    """Keyword-only parameters: `leading` ones, one per field of `cls`, then `after` ones."""
    hints = typing.get_type_hints(cls)
    params = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=t) for n, t in leading.items()]
    for f in dataclasses.fields(cls):
        default = inspect.Parameter.empty if f.metadata.get("required") else f.default
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=hints[f.name]))
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, annotation=t) for n, t in (after or {}).items()]
    return inspect.Signature(params)
