"""Typed, frozen experiment configs and the one flag parser that serves every experiment.

    @dataclasses.dataclass(frozen=True)
    class Config:
        FLAG_ALIASES: ClassVar[dict[str, str]] = {"learning_rate": "policy.learning_rate"}
        tau: float = 0.5
        schemes: tuple[str, ...] = ("linear", "softmax")
        policy: OptimizerConfig = OptimizerConfig()  # a section: --policy.learning_rate=3e-4
        def __post_init__(self):  # validate; raise ValueError("name=value is invalid; ...")
            ...

    PRESETS = {"tiny": {"steps": 10, "policy.learning_rate": 1e-3}}
    cfg = parse_flags(Config, argv, presets=PRESETS, prog="python -m experiments.x")

Flags are `--name=value` (or `--name value`); tuples are comma separated; bools accept
true/false/1/0/yes/no and a bare `--flag`. A dataclass-typed field is a section: its fields are
dotted flags, any depth, and it is rebuilt with dataclasses.replace so its own __post_init__
validates it. An optional section (`critic: X | None = None`) is built from X's defaults once one
of its fields is set; `--critic=none` turns it off. FLAG_ALIASES keep the flat flags users already
type working after a field moves into a section. `--preset=NAME` (plain, dotted, alias or
nested-dict keys) applies first, then the other flags. Any bad flag or value prints ONE line
`prog: error: ...` and exits with code 2, before anything is compiled. config_to_dict and
config_diff let a resumed run compare its saved JSON config.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import re
import sys
import types
import typing
from typing import Any, Mapping, Sequence, TypeVar

C = TypeVar("C")

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class FlagError(ValueError):
    """A flag that does not parse or does not validate."""


def _convert_scalar(name: str, text: str, typ: Any) -> Any:
    if typ is bool and text.lower() in _TRUE | _FALSE:
        return text.lower() in _TRUE
    if typ is str:
        return text
    expected = {bool: "true or false", int: "an integer", float: "a number"}.get(typ)
    if expected is None:
        raise FlagError(f"--{name}: unsupported field type {typ!r}")
    try:
        if typ is not bool:
            return typ(text)
    except ValueError:
        pass
    raise FlagError(f"--{name}={text} is invalid; expected {expected}")


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
        elem = (typing.get_args(typ) or (str,))[0]
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


# --- Sections, paths and aliases -----------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _fields(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
    """name -> (resolved annotation, Field) of the fields a flag may set (ClassVars excluded)."""
    hints = typing.get_type_hints(cls)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls) if f.init}


def _section(typ: Any) -> tuple[type | None, bool]:
    """(the dataclass a field's type makes it a section of, or None; whether None is allowed)."""
    if isinstance(typ, type) and dataclasses.is_dataclass(typ):
        return typ, False
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(typ) if a is not type(None)]
        if len(rest) == 1 and isinstance(rest[0], type) and dataclasses.is_dataclass(rest[0]):
            return rest[0], True
    return None, False


def _field_default(cls: type, name: str) -> Any:
    f = _fields(cls)[name][1]
    has_factory = f.default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING
    return f.default_factory() if has_factory else f.default  # MISSING when there is none


def _resolve(cls: type, dotted: str) -> tuple[tuple[str, ...], Any]:
    """The canonical path and annotated type a (dotted, possibly aliased) name refers to."""
    path: tuple[str, ...] = ()
    cur, rest = cls, dotted
    for _ in range(100):  # bounds alias loops
        fields = _fields(cur)
        aliases = getattr(cur, "FLAG_ALIASES", None) or {}
        head, _, tail = rest.partition(".")
        if rest not in fields and rest in aliases:
            rest = aliases[rest]
            continue
        if head not in fields and head in aliases:
            rest = aliases[head] + ("." + tail if tail else "")
            continue
        if head not in fields:
            break
        path, typ = path + (head,), fields[head][0]
        if not tail:
            return path, typ
        cur = _section(typ)[0]
        if cur is None:
            break
        rest = tail
    raise FlagError(f"--{dotted} is not a flag of this experiment (see --help)")


@functools.lru_cache(maxsize=None)
def _alias_index(cls: type) -> dict[tuple[str, ...], tuple[str, ...]]:
    """canonical path -> the aliases that reach it, checking every FLAG_ALIASES under `cls`."""
    index: dict[tuple[str, ...], tuple[str, ...]] = {}

    def walk(sec: type, prefix: tuple[str, ...]) -> None:
        for key, target in (getattr(sec, "FLAG_ALIASES", None) or {}).items():
            where = f"{sec.__name__}.FLAG_ALIASES[{key!r}]"
            if key in _fields(sec):
                raise FlagError(f"{where} shadows the field {key}")
            try:
                path = prefix + _resolve(sec, target)[0]
            except FlagError:
                raise FlagError(f"{where} = {target!r} is not a field") from None
            index[path] = index.get(path, ()) + (".".join(prefix + (key,)),)
        for name, (typ, _) in _fields(sec).items():
            if _section(typ)[0] is not None:
                walk(_section(typ)[0], prefix + (name,))

    walk(cls, ())
    return index


# --- Assignments (path -> value) from one source: a preset or the command line ------------
def _assign(out: dict, path: tuple[str, ...], key: str, shown: str, value: Any) -> None:
    """Record one assignment; two spellings of the same field must agree (same spelling: last wins)."""
    for other, (okey, oshown, ovalue) in list(out.items()):
        same_value = other == path and _same(_to_json(ovalue), _to_json(value))
        if _overlap(other, path) and okey != key and not same_value:
            where = ".".join(min(path, other, key=len))
            raise FlagError(f"{oshown} and {shown} both set {where}; give one")
    out.pop(path, None)
    out[path] = (key, shown, value)


def _preset_values(cls: type, preset: Mapping[str, Any], out: dict, prefix=(), spell="") -> None:
    for key, value in preset.items():
        try:
            sub, typ = _resolve(cls, key)
        except FlagError:
            raise FlagError(f"{spell}{key} is not a field of this experiment") from None
        sec, optional = _section(typ)
        if sec is not None and isinstance(value, sec):  # a whole section: as a dict of its fields
            value = {n: getattr(value, n) for n in _fields(sec)}
        if sec is not None and isinstance(value, Mapping):
            _preset_values(sec, value, out, prefix + sub, f"{spell}{key}.")
        elif sec is not None and not (value is None and optional):
            raise FlagError(f"{spell}{key} is a section; give a dict of its fields")
        else:
            value = _from_json(value, typ)
            _assign(out, prefix + sub, spell + key, f"{spell}{key}={value!r}", value)


def _flag_values(cls: type, pairs: list[tuple[str, str | None]]) -> dict:
    out: dict = {}
    for key, text in pairs:
        if key == "preset":
            continue
        path, typ = _resolve(cls, key)
        sec, optional = _section(typ)
        if sec is not None:
            if not optional or text is None or text.lower() not in ("none", ""):
                raise FlagError(f"--{key} is a section; set its fields: --{key}.NAME=value (see --help)")
            value = None
        elif text is None:
            if typ is not bool:
                raise FlagError(f"--{key} needs a value: --{key}=...")
            value = True
        else:
            value = _convert(key, text, typ)
        _assign(out, path, key, f"--{key}" if text is None else f"--{key}={text}", value)
    return out


def _assemble(cls: type, base: Any, values: Mapping[tuple[str, ...], Any], prefix: tuple[str, ...]) -> Any:
    """Build `cls` (from `base` via dataclasses.replace when there is one) with `values` under `prefix`."""
    kwargs = {}
    for name, (typ, _) in _fields(cls).items():
        path = prefix + (name,)
        if path in values:
            kwargs[name] = values[path]
        elif any(k[: len(path)] == path for k in values):
            sub = getattr(base, name) if base is not None else _field_default(cls, name)
            sec = _section(typ)[0]
            kwargs[name] = _assemble(sec, sub if isinstance(sub, sec) else None, values, path)
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except FlagError:  # already names its section
        raise
    except (ValueError, TypeError) as e:
        raise FlagError(_in_section(prefix, cls, str(e).splitlines()[0] if str(e) else repr(e))) from None


def _in_section(prefix: tuple[str, ...], cls: type, message: str) -> str:
    """`b1=1.5 is invalid` raised inside section policy reads `policy.b1=1.5 is invalid`; any other
    message gets a `policy: ` prefix, so the user always learns which section refused."""
    head = re.match(r"(\w+)([=: ]|$)", message)
    joint = "." if head and head.group(1) in _fields(cls) else ": "
    return f"{'.'.join(prefix)}{joint}{message}" if prefix else message


# --- Help, build, parse ------------------------------------------------------------------------
def flags_help(cls: type, presets: Mapping[str, Mapping[str, Any]] | None, prog: str) -> str:
    lines = [f"usage: {prog} [--preset=NAME] [--name=value ...]", ""]
    if presets:
        lines.append(f"presets: {', '.join(presets)}")
    aliases = _alias_index(cls)

    def walk(sec: type, base: Any, prefix: tuple[str, ...]) -> None:
        for name, (typ, _) in _fields(sec).items():
            path = prefix + (name,)
            default = getattr(base, name) if base is not None else _field_default(sec, name)
            note = "".join(f"; alias --{a}" for a in aliases.get(path, ()))
            inner, optional = _section(typ)
            if inner is not None:
                if optional:
                    shown = "none" if default is None else "on"
                    lines.append(f"  --{'.'.join(path)}={shown}   (optional {inner.__name__} section{note})")
                walk(inner, default if isinstance(default, inner) else None, path)
                continue
            if default is dataclasses.MISSING:
                default = "(required)"
            elif isinstance(default, tuple):
                default = ",".join(map(str, default))
            lines.append(f"  --{'.'.join(path)}={default}   ({_type_name(typ)}{note})")

    walk(cls, None, ())
    return "\n".join(lines)


def _type_name(t: Any) -> str:
    if typing.get_origin(t) is None and hasattr(t, "__name__"):
        return t.__name__
    return str(t).replace("typing.", "")


def build_config(cls: type[C], argv: Sequence[str], presets: Mapping[str, Mapping[str, Any]] | None = None) -> C:
    """Parse `argv` into `cls`. Raises FlagError (a ValueError) with a one-line message."""
    _alias_index(cls)  # a bad FLAG_ALIASES table fails every run, not only the ones that use it
    pairs = _split_argv(argv)
    values: dict = {}
    for key, text in pairs:
        if key == "preset":
            if not presets or text not in presets:
                allowed = ", ".join(presets or {}) or "none"
                raise FlagError(f"--preset={text} is unknown; allowed: {allowed}")
            one: dict = {}
            try:
                _preset_values(cls, presets[text], one)
            except FlagError as e:
                raise FlagError(f"preset {text}: {e}") from None
            _override(values, one)
    _override(values, _flag_values(cls, pairs))  # flags always win over presets
    return _assemble(cls, None, {path: v for path, (_, _, v) in values.items()}, ())


def _override(values: dict, later: dict) -> None:
    """Apply a later source: each of its paths drops what an earlier source set at or under it."""
    for path, assignment in later.items():
        for other in [o for o in values if _overlap(o, path)]:
            del values[other]
        values[path] = assignment


def _overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two paths set the same field, or one sets a section the other reaches into."""
    n = min(len(a), len(b))
    return a[:n] == b[:n]


def parse_flags(cls: type[C], argv: Sequence[str] | None = None, *,
                presets: Mapping[str, Mapping[str, Any]] | None = None, prog: str = "rlsoft") -> C:
    """`build_config` for a command line: --help prints the flags; errors exit 2 with one line."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if "--help" in argv or "-h" in argv:
            print(flags_help(cls, presets, prog))
            raise SystemExit(0)
        return build_config(cls, argv, presets)
    except FlagError as e:
        print(f"{prog}: error: {e}".replace("\n", "\\n"), file=sys.stderr)  # one line, always
        raise SystemExit(2) from None


def check(condition: bool, message: str) -> None:
    """Config validation helper for `__post_init__`: raise ValueError(message) unless condition."""
    if not condition:
        raise ValueError(message)


def check_finite(condition: bool, name: str, value: float, need: str) -> None:
    """`check` for a number, one message shape for all: `value > 0` lets inf through and a negated
    condition lets NaN through, so the value must also be finite. `name=value is invalid; need ...`"""
    if not (condition and isinstance(value, numbers.Real) and math.isfinite(value)):
        raise ValueError(f"{name}={value} is invalid; need {need}")


# --- Configs as JSON, for resuming runs ------------------------------------------------------
def _to_json(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return config_to_dict(value)
    if isinstance(value, (bool, str)) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else ("nan" if v != v else ("inf" if v > 0 else "-inf"))
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _to_json(v) for k, v in value.items()}
    return str(value)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-able nested dict of a (nested) dataclass config's init fields: sections as dicts,
    tuples as lists, nan/inf as "nan"/"inf"/"-inf" (bare NaN is not valid JSON)."""
    return {name: _to_json(getattr(cfg, name)) for name in _fields(type(cfg))}


def _from_json(value: Any, typ: Any) -> Any:
    """Undo config_to_dict's JSON forms for a field of type `typ` (lists -> tuples, "nan"/"inf" and
    ints -> floats where a float is expected); anything else is left to the dataclass to validate."""
    args = typing.get_args(typ) if typing.get_origin(typ) in (typing.Union, types.UnionType) else (typ,)
    if isinstance(value, (list, tuple)):
        elem = next(((typing.get_args(a) or (Any,))[0] for a in args if typing.get_origin(a) is tuple), Any)
        return tuple(_from_json(v, elem) for v in value)
    if float in args and isinstance(value, str) and value in _NONFINITE:
        return _NONFINITE[value]
    if float in args and int not in args and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted name -> JSON value of every leaf of a (nested) dict or config."""
    out = {}
    for key, value in _to_json(data).items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(map(_same, a, b))
    return a == b


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted name -> (saved, current) for every field whose values differ; a field on one side
    only differs too, with None for the missing side. Either side may also be a config itself."""
    old, new = _flatten(saved), _flatten(current)
    keys = list(old) + [k for k in new if k not in old]
    return {k: (old.get(k), new.get(k)) for k in keys
            if k not in old or k not in new or not _same(old[k], new[k])}
