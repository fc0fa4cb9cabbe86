"""Settings dataclasses as the one place a setting is written: its type, default and help, and its file form.

A long-running verb (`train`, `finetune`, `tune`, `classify train`) takes one settings dataclass. Each field is
typed, has a default (or none: then it is required) and an attribute docstring right below it:

    max_iters: int | None = None
    \"\"\"Budget: optimizer steps.\"\"\"

From that alone the CLI makes the flag and its help (lmforge.cli), a YAML file gives the same settings
(`--config FILE.yaml`, flags overriding it), and a run folder keeps the settings it ran as YAML (`write_config`),
which `--config` reads back as is. Fields without a default that are not keyword-only are the verb's positional
arguments; keyword-only fields without a default are required flags.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import types
import typing
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_write_text


class SettingsError(LmforgeError):
    """A settings file or value that does not fit its dataclass; names the file and the key."""


def unwrap_optional(tp):
    """`X | None` -> X (other types as they are)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


def field_types(cls) -> dict[str, object]:
    return typing.get_type_hints(cls)


def field_docs(cls) -> dict[str, str]:
    """{field: its attribute docstring}, read from the source of `cls` and its dataclass bases."""
    docs: dict[str, str] = {}
    for klass in reversed([k for k in cls.__mro__ if dataclasses.is_dataclass(k)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body
        for stmt, after in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(after.value.value).split())
    return docs


def has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def default_of(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def is_positional(f: dataclasses.Field) -> bool:
    """A required field that may be passed by position: the verb's positional argument."""
    return not has_default(f) and not f.kw_only


# ---------------------------------------------------------------------------------------------- values


def coerce(name: str, tp, value, where: str):
    """`value` (from YAML or JSON) as field `name`'s type `tp`; SettingsError naming `where` and the key if it
    cannot be. YAML reads `1e-3` as a string: a number in a string is taken for a float or int field."""

    def bad(expected: str) -> SettingsError:  # the key as the file spells it, not as a flag
        return SettingsError(f"{where}: {name} takes {expected}, not {value!r}", param="config")

    optional = tp is not unwrap_optional(tp)
    tp = unwrap_optional(tp)
    if value is None:
        if optional:
            return None
        raise bad("a value")
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or (isinstance(value, str) and str(choice) == value):
                return choice
        raise bad("one of " + ", ".join(map(str, choices)))
    if origin is list:
        if not isinstance(value, list):
            raise bad("a list")
        (item,) = typing.get_args(tp) or (str,)
        return [coerce(name, item, v, where) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad("a mapping")
        return {str(k): v for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp in (int, float):
        if isinstance(value, str):
            try:
                value = float(value) if tp is float else int(value)
            except ValueError:
                raise bad("an int" if tp is int else "a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("an int" if tp is int else "a number")
        if tp is int and value != int(value):
            raise bad("an int")
        return tp(value)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    return value


def read_config(cls, path: str | Path) -> dict:
    """The settings a YAML (or JSON) file gives for dataclass `cls`, typed: {field: value}. An unknown key, or a
    value of the wrong type, is an error that names the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file {path} not found", param="config")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise SettingsError(f"config file {path} cannot be read: {e}", param="config") from None
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise SettingsError(f"config file {path} must be a mapping of setting: value", param="config")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init and not f.name.startswith("_")}
    types_ = field_types(cls)
    out = {}
    for key, value in doc.items():
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SettingsError(
                f"config file {path}: unknown setting {key!r}{hint}; the settings are: {', '.join(fields)}",
                param="config",
            )
        out[key] = coerce(key, types_[key], value, f"config file {path}")
    return out


def to_yaml(config, exclude: tuple[str, ...] = (), header: str = "") -> str:
    """The dataclass `config` as a YAML document `read_config` reads back to an equal one (field order kept)."""
    import yaml

    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in exclude}
    body = yaml.safe_dump(values, sort_keys=False, allow_unicode=True, width=120)
    return "".join(f"# {line}\n" for line in header.splitlines()) + body


def write_config(path: str | Path, config, exclude: tuple[str, ...] = (), header: str = "") -> Path:
    """Write `config` as YAML, atomically."""
    atomic_write_text(Path(path), to_yaml(config, exclude, header))
    return Path(path)


def check_choices(config, error: type[LmforgeError] = SettingsError) -> None:
    """Raise `error` naming the first field whose value is not one of its `Literal[...]` choices."""
    types_ = field_types(type(config))
    for f in dataclasses.fields(config):
        name, tp = f.name, types_[f.name]
        base, value = unwrap_optional(tp), getattr(config, name)
        if typing.get_origin(base) is typing.Literal and not (value is None and base is not tp):
            choices = typing.get_args(base)
            if value not in choices:
                raise error(f"{{param}}={value!r} is not one of: {', '.join(map(str, choices))}", param=name)
