"""The `lmforge` command: one table maps each verb to a plain function.

Flags come from each function's signature and its Google-style "Args:" docstring, so the help text is the
docstring and a verb is added by writing a typed function and one line in COMMANDS. Parameters without a
default, and positional-only ones (before `/`), are positional; `x: bool = False` becomes `--x`, `x: bool = True`
becomes `--no-x`; `list[...]` takes several values; `Literal[...]` gives choices.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
import types
import typing

# verb -> "module:function"; the module is imported only when its verb runs, so `lmforge --help` stays fast.
COMMANDS: dict[str, str] = {
    "demo": "lmforge.demo:demo",
    "prepare": "lmforge.data:prepare_command",
    "train": "lmforge.train.trainer:train_command",
    "tune": "lmforge.train.tune:tune_command",
    "eval": "lmforge.evaluate:eval_command",
    "generate": "lmforge.apps.generate:generate_command",
    "import": "lmforge.apps.convert:import_command",
    "export": "lmforge.apps.convert:export_command",
    "bench": "lmforge.apps.bench:bench_command",
    "quantize": "lmforge.apps.convert:quantize_command",
    "serve": "lmforge.serve.app:serve_command",
    "chat": "lmforge.serve.chat:chat_command",
    "finetune": "lmforge.apps.finetune:finetune_command",
    "classify": "lmforge.apps.classify:classify_command",
    "translate": "lmforge.apps.translate:translate_command",
    "explain": "lmforge.apps.explain:explain_command",
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


def _unwrap_optional(tp):
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(inner) == 1:
            return inner[0]
    return tp


class ExtendList(argparse.Action):
    """A list flag given several times keeps every value (`--space a=1 --space b=2`); its default goes at once."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is self.default:
            setattr(namespace, self.dest, [])
        getattr(namespace, self.dest).extend(values)


def add_function_arguments(parser: argparse.ArgumentParser, fn) -> None:
    _, helps = parse_docstring(fn.__doc__)
    hints = typing.get_type_hints(fn)
    for name, param in inspect.signature(fn).parameters.items():
        tp = _unwrap_optional(hints.get(name, str))
        help_text = helps.get(name, "")
        flag = "--" + name.replace("_", "-")
        kwargs: dict = {"help": help_text}
        if typing.get_origin(tp) is typing.Literal:
            kwargs["choices"] = list(typing.get_args(tp))
            kwargs["type"] = type(kwargs["choices"][0])
        elif typing.get_origin(tp) is list:
            kwargs["nargs"] = "*"
            kwargs["action"] = ExtendList
            kwargs["type"] = (typing.get_args(tp) or (str,))[0]
        elif tp is bool:
            pass
        else:
            kwargs["type"] = tp
        if param.kind is inspect.Parameter.POSITIONAL_ONLY and param.default is not inspect.Parameter.empty:
            parser.add_argument(name, nargs="?", default=param.default, **kwargs)  # `def f(model=None, /)`
        elif param.default is inspect.Parameter.empty:
            parser.add_argument(name, **kwargs)
        elif tp is bool:
            if param.default:
                parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_false",
                                    help=help_text)
            else:
                parser.add_argument(flag, dest=name, action="store_true", help=help_text)
        else:
            if param.default is not None:
                kwargs["help"] = f"{help_text} (default: {param.default})".strip()
            parser.add_argument(flag, dest=name, default=param.default, **kwargs)


def load(verb: str):
    module, function = COMMANDS[verb].split(":")
    return getattr(importlib.import_module(module), function)


def build_parser(verbs: list[str] | None = None) -> argparse.ArgumentParser:
    import lmforge

    parser = argparse.ArgumentParser(prog="lmforge", description=f"lmforge {lmforge.__version__}: {lmforge.__doc__.split(': ', 1)[1]}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND")
    for verb in COMMANDS:
        if verbs is not None and verb not in verbs:
            sub.add_parser(verb, help="")
            continue
        fn = load(verb)
        summary, _ = parse_docstring(fn.__doc__)
        p = sub.add_parser(verb, help=summary, description=inspect.cleandoc(fn.__doc__ or "").split("Args:")[0].strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_function_arguments(p, fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb is not None and verb not in COMMANDS:
        print(f"lmforge: unknown command {verb!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    # Only the named verb's module is imported; `lmforge --help` imports them all to list their summaries.
    parser = build_parser([verb] if verb else None)
    args = vars(parser.parse_args(argv))
    verb = args.pop("verb")
    if verb is None:
        parser.print_help()
        return 0
    fn = load(verb)
    positional = [args.pop(name) for name, p in inspect.signature(fn).parameters.items()
                  if p.kind is inspect.Parameter.POSITIONAL_ONLY]
    try:
        result = fn(*positional, **args)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as e:
        print(f"lmforge {verb}: error: {e}", file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    raise SystemExit(main())
