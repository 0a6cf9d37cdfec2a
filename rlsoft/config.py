"""Typed, frozen experiment configs and the one flag parser that serves every experiment.

Usage in an experiment module:

    @dataclasses.dataclass(frozen=True)
    class Config:
        tau: float = 0.5
        schemes: tuple[str, ...] = ("linear", "softmax")
        def __post_init__(self):  # validate; raise ValueError("name=value is invalid; ...")
            ...

    PRESETS = {"tiny": {"steps": 10}}

    def main(argv=None):
        cfg = parse_flags(Config, argv, presets=PRESETS, prog="python -m experiments.x")

Flags are `--name=value` (or `--name value`); tuples are comma separated; bools accept
true/false/1/0/yes/no and a bare `--flag`. `--preset=NAME` applies a preset first, then the other
flags. Any bad flag or value prints ONE line `prog: error: ...` and exits with code 2, before
anything is compiled.
"""
from __future__ import annotations

import dataclasses
import sys
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class FlagError(ValueError):
    """A flag that does not parse or does not validate."""


def _convert_scalar(name: str, text: str, typ: Any) -> Any:
    if typ is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise FlagError(f"--{name}={text} is invalid; expected true or false")
    if typ is int:
        try:
            return int(text)
        except ValueError:
            raise FlagError(f"--{name}={text} is invalid; expected an integer") from None
    if typ is float:
        try:
            return float(text)
        except ValueError:
            raise FlagError(f"--{name}={text} is invalid; expected a number") from None
    if typ is str:
        return text
    raise FlagError(f"--{name}: unsupported field type {typ!r}")


def _convert(name: str, text: str, typ: Any) -> Any:
    """Convert flag text to a field's annotated type (scalars, Optional/unions, tuples)."""
    origin = typing.get_origin(typ)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(typ)
        if type(None) in args and text.lower() in ("none", ""):
            return None
        errors = []
        # Try the narrower types first so that "0.5" is a float and "auto" a str.
        for arg in sorted((a for a in args if a is not type(None)), key=_narrowness):
            try:
                return _convert(name, text, arg)
            except FlagError as e:
                errors.append(str(e))
        raise FlagError(errors[-1] if errors else f"--{name}={text} is invalid")
    if origin is tuple:
        args = typing.get_args(typ)
        elem = args[0] if args else str
        parts = [p for p in text.split(",") if p != ""]
        return tuple(_convert(name, p.strip(), elem) for p in parts)
    return _convert_scalar(name, text, typ)


def _narrowness(t: Any) -> int:
    return {bool: 0, int: 1, float: 2, str: 9}.get(t, 5)


def _split_argv(argv: Sequence[str]) -> list[tuple[str, str | None]]:
    pairs, i = [], 0
    argv = list(argv)
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or arg == "--":
            raise FlagError(f"unexpected argument {arg!r}; flags look like --name=value")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = body, argv[i + 1]
            i += 1
        else:
            key, value = body, None
        pairs.append((key.replace("-", "_"), value))
        i += 1
    return pairs


def flags_help(cls: type, presets: Mapping[str, Mapping[str, Any]] | None, prog: str) -> str:
    hints = typing.get_type_hints(cls)
    lines = [f"usage: {prog} [--preset=NAME] [--name=value ...]", ""]
    if presets:
        lines.append(f"presets: {', '.join(presets)}")
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, tuple):
            default = ",".join(map(str, default))
        lines.append(f"  --{f.name}={default}   ({_type_name(hints[f.name])})")
    return "\n".join(lines)


def _type_name(t: Any) -> str:
    return getattr(t, "__name__", None) or str(t).replace("typing.", "")


def build_config(
    cls: type[C], argv: Sequence[str], presets: Mapping[str, Mapping[str, Any]] | None = None
) -> C:
    """Parse `argv` into `cls`. Raises FlagError (a ValueError) with a one-line message."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    pairs = _split_argv(argv)
    for key, text in pairs:
        if key == "preset":
            if not presets or text not in presets:
                allowed = ", ".join(presets or {}) or "none"
                raise FlagError(f"--preset={text} is unknown; allowed: {allowed}")
            values.update(presets[text])
    for key, text in pairs:
        if key == "preset":
            continue
        if key not in names:
            raise FlagError(f"--{key} is not a flag of this experiment (see --help)")
        if text is None:
            if hints[key] is not bool:
                raise FlagError(f"--{key} needs a value: --{key}=...")
            text = "true"
        values[key] = _convert(key, text, hints[key])
    try:
        return cls(**values)
    except (ValueError, TypeError) as e:
        raise FlagError(str(e).splitlines()[0]) from None


def parse_flags(
    cls: type[C],
    argv: Sequence[str] | None = None,
    *,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
    prog: str = "rlsoft",
) -> C:
    """`build_config` for a command line: --help prints the flags; errors exit 2 with one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(flags_help(cls, presets, prog))
        raise SystemExit(0)
    try:
        return build_config(cls, argv, presets)
    except FlagError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check(condition: bool, message: str) -> None:
    """Config validation helper for `__post_init__`: raise ValueError(message) unless condition."""
    if not condition:
        raise ValueError(message)
