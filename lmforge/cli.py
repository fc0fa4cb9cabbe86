"""The `lmforge` command: one table maps each verb to a plain function.

A verb's flags come from what the function takes, so each setting is written in one place:

- a settings dataclass (`def train_command(config: TrainConfig)`): one flag per field, its help the field's
  attribute docstring (lmforge.settings), plus `--config FILE.yaml` giving any of them from a file (the flags
  given override it). Required fields that are not keyword-only are the positional arguments.
- plain typed parameters (`def eval_command(model: str, split: str = "val")`): the help of each is its entry
  in the Google-style "Args:" docstring; parameters without a default, and positional-only ones (before `/`),
  are positional.

Either way a `bool` becomes the pair `--x` / `--no-x`, `list[...]` takes several values, `dict[...]` takes
NAME=VALUE pairs and `Literal[...]` gives choices. An error that names its setting (LmforgeError.param) is
printed with the setting spelled as its flag.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
import typing

from lmforge.errors import LmforgeError
from lmforge.settings import (
    SettingsError,
    default_of,
    field_docs,
    field_types,
    has_default,
    is_positional,
    read_config,
    unwrap_optional,
)

# verb -> "module:function" (or {action: "module:function"}); the module is imported only when its verb runs, so
# `lmforge --help` stays fast.
COMMANDS: dict[str, str | dict[str, str]] = {
    "demo": "lmforge.demo:demo",
    "prepare": "lmforge.data:prepare_command",
    "train": "lmforge.train.trainer:train_command",
    "tune": "lmforge.train.tune:tune_command",
    "eval": "lmforge.evaluate:eval_command",
    "generate": "lmforge.apps.generate:generate_command",
    "embed": "lmforge.apps.embed:embed_command",
    "import": "lmforge.apps.convert:import_command",
    "export": "lmforge.apps.convert:export_command",
    "bench": "lmforge.apps.bench:bench_command",
    "quantize": "lmforge.apps.convert:quantize_command",
    "serve": "lmforge.serve.app:serve_command",
    "chat": "lmforge.serve.chat:chat_command",
    "finetune": "lmforge.apps.finetune:finetune_command",
    "classify": {
        "train": "lmforge.apps.classify:train_command",
        "predict": "lmforge.apps.classify:predict_command",
        "eval": "lmforge.apps.classify:eval_command",
    },
    "translate": "lmforge.apps.translate:translate_command",
    "explain": "lmforge.apps.explain:explain_command",
}

# Flags renamed to one name per concept (OpenAI's where there is one), verb -> {old: new}. The old spelling still
# works for one release, with a line on stderr; delete an entry when its release is out.
RENAMED: dict[str, dict[str, str]] = {
    "generate": {
        "--max-new-tokens": "--max-tokens",
        "--num-samples": "--n",
        "--speculative-k": "--num-speculative-tokens",
    },
    "translate": {"--max-new-tokens": "--max-tokens"},
}


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """Split a Google-style docstring into its summary and the text of each `Args:` entry."""
    doc = inspect.cleandoc(doc or "")
    summary = doc.split("\n\n")[0].strip()
    args: dict[str, str] = {}
    m = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, re.M)
    if m:
        name = None
        for line in m.group(1).splitlines():
            entry = re.match(r"\s{2,4}(\w+)(?: \([^)]*\))?:\s*(.*)", line)
            if entry:
                name = entry.group(1)
                args[name] = entry.group(2)
            elif name and line.strip():
                args[name] += " " + line.strip()
    return summary, args


# ---------------------------------------------------------------------------------------------- flags


class ExtendList(argparse.Action):
    """A list flag given several times keeps every value (`--space a=1 --space b=2`); its default goes at once."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        if current is self.default or current is None:
            current = []
        setattr(namespace, self.dest, [*current, *values])


class NameValues(argparse.Action):
    """`--fixed max_iters=300 lr=1e-3` -> {"max_iters": "300", "lr": "1e-3"}: the values stay strings for the
    consumer to type (a YAML file gives the same mapping with typed values)."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        pairs = dict(current) if isinstance(current, dict) and current is not self.default else {}
        for item in values:
            name, eq, value = item.partition("=")
            if not eq or not name.strip():
                parser.error(f"{option_string}: expected NAME=VALUE, got {item!r}")
            pairs[name.strip()] = value
        setattr(namespace, self.dest, pairs)


class Switch(argparse.Action):
    """`--x` turns a setting on and `--no-x` off, so either way overrides a config file."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, not option_string.startswith("--no-"))

    def format_usage(self) -> str:
        return " | ".join(self.option_strings)


def add_argument(
    parser: argparse.ArgumentParser,
    name: str,
    tp,
    default,
    help_text: str,
    *,
    positional: bool = False,
    optional_positional: bool = False,
    suppress: bool = False,
) -> None:
    """One flag (or positional) `name` of type `tp`. `suppress`: an option not given stays out of the namespace
    (so a config file's value is not overridden by a default); `default` is then only shown in the help."""
    tp = unwrap_optional(tp)
    flag = "--" + name.replace("_", "-")
    kwargs: dict = {}
    if typing.get_origin(tp) is typing.Literal:
        kwargs["choices"] = list(typing.get_args(tp))
        kwargs["type"] = type(kwargs["choices"][0])
    elif typing.get_origin(tp) is list:
        kwargs.update(nargs="*", action=ExtendList, type=(typing.get_args(tp) or (str,))[0])
    elif typing.get_origin(tp) is dict:
        kwargs.update(nargs="*", action=NameValues, metavar="NAME=VALUE")
    elif tp is not bool:
        kwargs["type"] = tp
    if positional or optional_positional:
        if optional_positional:
            kwargs["nargs"] = "?"
        parser.add_argument(
            name, default=argparse.SUPPRESS if suppress else default, help=help_text, metavar=name.upper(), **kwargs
        )
        return
    shown = {True: "on", False: "off"}.get(default, default) if tp is bool else default
    if tp is bool:
        off = f"--no-{flag[2:]}"
        if default is not None:
            help_text = f"{help_text} (default: {shown}{f'; {off} turns it off' if default else ''})".strip()
        parser.add_argument(
            flag, off, dest=name, action=Switch, help=help_text, default=argparse.SUPPRESS if suppress else default
        )
        return
    if default is not None and default != [] and default != {}:
        help_text = f"{help_text} (default: {shown})".strip()
    parser.add_argument(flag, dest=name, default=argparse.SUPPRESS if suppress else default, help=help_text, **kwargs)


def settings_parameter(fn) -> tuple[str, type] | None:
    """(name, class) of the settings dataclass `fn` takes, if it takes one."""
    for name, tp in typing.get_type_hints(fn).items():
        if name != "return" and dataclasses.is_dataclass(tp):
            return name, tp
    return None


def add_function_arguments(parser: argparse.ArgumentParser, fn) -> None:
    """The flags of `fn`: from its settings dataclass and `--config`, or from its parameters and docstring."""
    settings = settings_parameter(fn)
    if settings is not None:
        cls = settings[1]
        docs, types_ = field_docs(cls), field_types(cls)
        for f in dataclasses.fields(cls):
            default = default_of(f) if has_default(f) else None
            add_argument(
                parser,
                f.name,
                types_[f.name],
                default,
                docs.get(f.name, ""),
                optional_positional=is_positional(f),
                suppress=True,
            )
        parser.add_argument(
            "--config",
            metavar="FILE.yaml",
            help="read settings from a YAML file (a run's "
            "saved config, `lmforge tune`'s best.yaml, ...); flags given as well override it",
        )
        return
    _, helps = parse_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        required = param.default is inspect.Parameter.empty
        positional_only = param.kind is inspect.Parameter.POSITIONAL_ONLY
        add_argument(
            parser,
            name,
            hints.get(name, str),
            None if required else param.default,
            helps.get(name, ""),
            positional=required,
            optional_positional=positional_only and not required,
        )


# ---------------------------------------------------------------------------------------------- the parser


def load(verb: str, action: str | None = None):
    target = COMMANDS[verb]
    if isinstance(target, dict):
        target = target[action]
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


def _add_verb(sub, name: str, fn) -> None:
    summary, _ = parse_docstring(fn.__doc__)
    description = inspect.cleandoc(fn.__doc__ or "").split("Args:")[0].strip()
    p = sub.add_parser(
        name, help=summary, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_function_arguments(p, fn)


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    import lmforge

    parser = argparse.ArgumentParser(
        prog="lmforge", description=f"lmforge {lmforge.__version__}: {lmforge.__doc__.split(': ', 1)[1]}"
    )
    parser.add_argument("--version", action="version", version=f"lmforge {lmforge.__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb, target in COMMANDS.items():
        if verbs is not None and verb not in verbs:
            sub.add_parser(verb, help="")
        elif isinstance(target, dict):
            group = sub.add_parser(verb, help=f"{verb} {' | '.join(target)}: see `lmforge {verb} ACTION --help`")
            actions = group.add_subparsers(dest="action", metavar="ACTION", required=True)
            for action in target:
                _add_verb(actions, action, load(verb, action))
        else:
            _add_verb(sub, verb, load(verb))
    return parser


def spell(fn, name: str) -> str:
    """How the command line of `fn` spells setting `name`: `DATA` for a positional, else `--max-iters`."""
    settings = settings_parameter(fn)
    if settings is not None:
        positional = {f.name for f in dataclasses.fields(settings[1]) if is_positional(f)}
    else:
        positional = {
            n
            for n, p in inspect.signature(fn).parameters.items()
            if p.default is inspect.Parameter.empty or p.kind is inspect.Parameter.POSITIONAL_ONLY
        }
    return name.upper() if name in positional else "--" + name.replace("_", "-")


def rename_old_flags(verb: str, argv: list[str]) -> list[str]:
    """Old spellings of renamed flags -> the new ones, with a deprecation line for each on stderr."""
    renamed = RENAMED.get(verb, {})
    out = []
    for arg in argv:
        old, eq, value = arg.partition("=")
        if old in renamed:
            print(
                f"lmforge {verb}: {old} is deprecated and goes in the next release; use {renamed[old]}", file=sys.stderr
            )
            arg = renamed[old] + eq + value
        out.append(arg)
    return out


def build_settings(cls, given: dict, config_file: str | None):
    """The settings dataclass: its defaults, then the config file's values, then the flags given."""
    values = {**(read_config(cls, config_file) if config_file else {}), **given}
    for f in dataclasses.fields(cls):
        if not has_default(f) and f.name not in values:
            where = f"`{f.name}:` in the config file" if config_file else "--config FILE.yaml"
            raise SettingsError(f"{{param}} is required: give it on the command line or as {where}", param=f.name)
    return cls(**values)


def parse_command(argv: list[str]):
    """(verb, action, function, parsed flags) for a command line; None for bare `lmforge`. argparse exits on a
    bad flag."""
    words = [a for a in argv if not a.startswith("-")]
    verb = words[0] if words else None
    target = COMMANDS.get(verb)
    action = words[1] if isinstance(target, dict) and len(words) > 1 and words[1] in target else None
    if verb is not None:
        argv = rename_old_flags(verb, argv)
    parser = build_parser([verb] if verb else None)  # only the named verb's module is imported
    args = vars(parser.parse_args(argv))
    args.pop("verb")
    args.pop("action", None)
    if verb is None:
        parser.print_help()
        return None
    return verb, action, load(verb, action), args


def call_arguments(fn, args: dict) -> tuple[list, dict]:
    """The (positional, keyword) arguments to call `fn` with: its settings dataclass built from the flags and
    `--config`, or its parameters."""
    settings = settings_parameter(fn)
    if settings is not None:
        name, cls = settings
        config_file = args.pop("config", None)
        return [], {name: build_settings(cls, args, config_file)}
    positional = [
        args.pop(name)
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    return positional, args


# A third-party module a verb needs -> the extra of pyproject.toml that installs it (`pip install lmforge[serve]`).
EXTRAS = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "pydantic": "serve",
    "prometheus_client": "serve",
    "outlines_core": "serve",
    "httpx": "serve",
    "jinja2": "serve",
    "sacrebleu": "apps",
    "rich": "apps",
    "optuna": "apps",
    "gguf": "gguf",
    "tensorboard": "tensorboard",
    "transformers": "dev",
}


def missing_extra(name: str, e: ModuleNotFoundError) -> int:
    """Name the extra that installs a missing module instead of a traceback; anything else is our bug: re-raise."""
    extra = EXTRAS.get((e.name or "").split(".")[0])
    if extra is None:
        raise e
    print(
        f"{name}: error: this command needs the '{e.name}' package, which lmforge's [{extra}] extra installs: "
        f"pip install 'lmforge[{extra}]'",
        file=sys.stderr,
    )
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb is not None and verb not in COMMANDS:
        print(f"lmforge: unknown command {verb!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        parsed = parse_command(argv)
    except ModuleNotFoundError as e:
        return missing_extra(f"lmforge {verb}", e)
    if parsed is None:
        return 0
    verb, action, fn, args = parsed
    name = f"lmforge {verb}" + (f" {action}" if action else "")
    try:
        positional, kwargs = call_arguments(fn, args)
        result = fn(*positional, **kwargs)
    except ModuleNotFoundError as e:
        return missing_extra(name, e)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except LmforgeError as e:
        print(f"{name}: error: {e.render(spell(fn, e.param)) if e.param else e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
