"""The search space of `lmforge tune`: specs (`NAME=SPEC`, or YAML) parsed into Optuna distributions over
TrainConfig's options, checked against TrainConfig's ranges before the first trial.

    lr=1e-4:3e-2:log     a range sampled on a log scale      dropout=0:0.3        a range (uniform)
    warmup_iters=0:200   an int range (the option is an int) dropout=0:0.3:0.1    a range with a step
    n_layer=2,4,6        choices                             optimizer=adamw,sgd  choices (str, bool, none)
"""

from __future__ import annotations

import difflib
import json
import math
import typing
from pathlib import Path

from lmforge.errors import LmforgeError
from lmforge.settings import unwrap_optional
from lmforge.train.trainer import TrainConfig

MANAGED = ("data", "out", "progress", "resume", "overwrite")  # set by the search itself, per trial


class TuneError(LmforgeError):
    """A bad search space, fixed option or study; the message names it and what is allowed."""


def option_types() -> dict[str, type]:
    """TrainConfig option -> its value type (int, float, bool or str), Optional unwrapped."""
    types = {}
    for name, tp in typing.get_type_hints(TrainConfig).items():
        tp = unwrap_optional(tp)
        types[name] = type(typing.get_args(tp)[0]) if typing.get_origin(tp) is typing.Literal else tp
    return types


def _check_name(name: str, what: str) -> type:
    types = option_types()
    if name in MANAGED:
        raise TuneError(f"{what}: {name!r} is set by the search itself (data and out are the command's arguments)")
    if name not in types:
        close = difflib.get_close_matches(name, list(types), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise TuneError(
            f"{what}: unknown option {name!r}; {hint}TrainConfig options: "
            f"{', '.join(n for n in types if n not in MANAGED)}"
        )
    return types[name]


def parse_value(name: str, text, tp: type, what: str):
    """One value of option `name` (a string from the command line, or a JSON/YAML value) as type `tp`."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("none", "null")):
        hint = typing.get_type_hints(TrainConfig)[name]
        if unwrap_optional(hint) is hint:  # not Optional
            raise TuneError(f"{what}: {name} cannot be none")
        return None
    if not isinstance(text, str):  # a JSON/YAML value
        if tp is float and isinstance(text, (int, float)) and not isinstance(text, bool):
            return float(text)
        if isinstance(text, tp) and not (tp is int and isinstance(text, bool)):
            return text
        raise TuneError(f"{what}: {name} takes {'an' if tp is int else 'a'} {tp.__name__}, not {text!r}")
    text = text.strip()
    if tp is bool:
        if text.lower() in ("true", "yes", "1"):
            return True
        if text.lower() in ("false", "no", "0"):
            return False
        raise TuneError(f"{what}: {name} takes true or false, not {text!r}")
    try:
        if tp is int:
            number = float(text)
            if number != int(number):
                raise ValueError
            return int(number)
        return tp(text)
    except ValueError:
        article = "an" if tp is int else "a"
        raise TuneError(f"{what}: cannot read {text!r} as {article} {tp.__name__} for {name}") from None


def parse_spec(spec: str):
    """`NAME=LOW:HIGH[:log|:STEP]` or `NAME=A,B,...` -> (name, optuna distribution)."""
    name, eq, body = spec.partition("=")
    name, body = name.strip(), body.strip()
    form = "NAME=LOW:HIGH, NAME=LOW:HIGH:log, NAME=LOW:HIGH:STEP or NAME=A,B,C"
    if not eq or not name or not body:
        raise TuneError(f"space spec {spec!r}: expected {form}")
    return name, make_distribution(name, body, f"space spec {spec!r}")


def make_distribution(name: str, spec, what: str):
    """An optuna distribution from a spec string, a list of choices, or a {low, high, log, step} / {choices} dict."""
    from optuna.distributions import CategoricalDistribution

    tp = _check_name(name, what)
    if isinstance(spec, dict):
        unknown = set(spec) - {"low", "high", "log", "step", "choices"}
        if unknown:
            raise TuneError(f"{what}: unknown keys {sorted(unknown)}; use low, high, log, step, or choices")
        if "choices" in spec:
            spec = list(spec["choices"])
        elif "low" in spec and "high" in spec:
            parts = (
                [spec["low"], spec["high"]]
                + (["log"] if spec.get("log") else [])
                + ([spec["step"]] if spec.get("step") is not None else [])
            )
            return _range(name, tp, parts, what)
        else:
            raise TuneError(f"{what}: a dict spec needs low and high, or choices")
    if isinstance(spec, str) and ":" in spec:
        return _range(name, tp, spec.split(":"), what)
    choices = [c for c in (spec.split(",") if isinstance(spec, str) else spec if isinstance(spec, list) else [spec])]
    if isinstance(spec, str) and any(not c.strip() for c in choices):
        raise TuneError(f"{what}: empty choice in {spec!r}")
    values = [parse_value(name, c, tp, what) for c in choices]
    if len(set(values)) != len(values):
        raise TuneError(f"{what}: repeated choices {values}")
    if not values:
        raise TuneError(f"{what}: no choices")
    return CategoricalDistribution(values)


def _range(name: str, tp: type, parts: list, what: str):
    from optuna.distributions import FloatDistribution, IntDistribution

    if tp not in (int, float):
        raise TuneError(f"{what}: {name} is a {tp.__name__} option; give choices (A,B,...), not a range")
    if len(parts) not in (2, 3) or (len(parts) == 3 and str(parts[2]).strip() == ""):
        raise TuneError(f"{what}: a range is LOW:HIGH, LOW:HIGH:log or LOW:HIGH:STEP")
    low, high = (parse_value(name, p, tp, what) for p in parts[:2])
    if low is None or high is None:
        raise TuneError(f"{what}: a range needs numbers at both ends")
    log = len(parts) == 3 and str(parts[2]).strip().lower() == "log"
    step = parse_value(name, parts[2], tp, what) if len(parts) == 3 and not log else None
    if not low < high:
        raise TuneError(f"{what}: LOW must be less than HIGH (got {low} and {high})")
    if log and low <= 0:
        raise TuneError(f"{what}: a log range needs LOW > 0 (got {low})")
    if step is not None and (step <= 0 or step > high - low):
        raise TuneError(f"{what}: STEP must be in (0, HIGH - LOW] (got {step})")
    if tp is int:
        return IntDistribution(low, high, log=log, step=step or 1)
    return FloatDistribution(low, high, log=log, step=step)


def parse_fixed(items: list[str] | dict) -> dict:
    """`NAME=VALUE` strings, or {name: value} (values as strings or typed), -> {name: typed value}."""
    pairs = {}
    for item in items:
        if isinstance(items, dict):
            name, value, what = item, items[item], f"fixed option {item}"
        else:
            name, eq, value = item.partition("=")
            what = f"fixed option {item!r}"
            if not eq or not name.strip():
                raise TuneError(f"{what}: expected NAME=VALUE, e.g. max_iters=300")
        name = name.strip()
        pairs[name] = parse_value(name, value, _check_name(name, what), what)
    return pairs


def load_space_file(path: str) -> tuple[dict, dict]:
    """A JSON or YAML file -> (space {name: distribution}, fixed {name: value})."""
    file = Path(path)
    if not file.is_file():
        raise TuneError(f"space file {path} not found")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml

        parse, errors = yaml.safe_load, yaml.YAMLError
    else:
        parse, errors = json.loads, json.JSONDecodeError
    try:
        doc = parse(text)
    except errors as e:  # the message names the line
        raise TuneError(f"space file {path}: cannot parse: {e}") from None
    if not isinstance(doc, dict):
        raise TuneError(f"space file {path}: expected a mapping of option -> spec")
    sections = set(doc) <= {"space", "fixed"}
    space_doc, fixed_doc = (doc.get("space") or {}, doc.get("fixed") or {}) if sections else (doc, {})
    space = {name: make_distribution(name, spec, f"space file {path}, {name}") for name, spec in space_doc.items()}
    fixed = {}
    for name, value in fixed_doc.items():
        fixed[name] = parse_value(name, value, _check_name(name, f"space file {path}"), f"space file {path}")
    return space, fixed


def grid_values(name: str, dist) -> list:
    """The finite values of a distribution, for the grid sampler."""
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if dist.step is not None and not dist.log:
        n = math.floor((dist.high - dist.low) / dist.step + 1e-9)
        return [round(dist.low + i * dist.step, 12) for i in range(n + 1)]
    raise TuneError(
        f"grid search: {name} is a continuous{' log' if dist.log else ''} range; give choices "
        f"({name}=A,B,C) or a step ({name}=LOW:HIGH:STEP)"
    )


def suggest(trial, name: str, dist):
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(name, dist.low, dist.high, step=dist.step, log=dist.log)


def check_settings(data: str, fixed: dict, space: dict) -> None:
    """Fail before the first trial if the fixed options, or any end of the space, are out of TrainConfig's range."""
    from optuna.distributions import CategoricalDistribution

    clash = sorted(set(fixed) & set(space))
    if clash:
        raise TuneError(f"{', '.join(clash)} is both searched and fixed; give it in one place")
    if not space:
        raise TuneError("empty search space: give --space NAME=SPEC ... or --space-file")
    ends = {
        name: dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
        for name, dist in space.items()
    }
    base = {**fixed, **{name: values[0] for name, values in ends.items()}, "data": data, "out": ""}
    try:
        TrainConfig(**base).check()
    except ValueError as e:
        raise TuneError(f"fixed options: {e}") from None
    for name, values in ends.items():
        for value in values:
            try:
                TrainConfig(**{**base, name: value}).check()
            except ValueError as e:
                raise TuneError(f"search space {name}: {e}") from None
