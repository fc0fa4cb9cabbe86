"""Hyperparameter search over TrainConfig with Optuna: a search space in, one run per trial, the best config out.

    OUT/study.db            the Optuna study (SQLite); the same command again resumes it and runs only what is left
    OUT/trials/<n>/         trial n's run folder (train.yaml, metrics.jsonl, loss.png). Only the best trial keeps
                            its checkpoints (best/, last/): a trial's are deleted as soon as it is not the best
    OUT/tune.png            the optimization history and the parameter importances
    OUT/tune.yaml           the settings of the search (TuneConfig)
    OUT/best.yaml           the best trial's whole TrainConfig: `lmforge train --config OUT/best.yaml` trains it again
                            (into OUT/best-run; flags given as well override it, e.g. --max-iters)

A search space gives one spec per TrainConfig option, `NAME=SPEC`:

    lr=1e-4:3e-2:log     a range sampled on a log scale      dropout=0:0.3        a range (uniform)
    warmup_iters=0:200   an int range (the option is an int) dropout=0:0.3:0.1    a range with a step
    n_layer=2,4,6        choices                             optimizer=adamw,sgd  choices (str, bool, none)

or the same in YAML (`--config`'s `space:` and `fixed:`, or a --space-file):
`{"lr": "1e-4:3e-2:log", "n_layer": [2, 4, 6], "dropout": {"low": 0, "high": 0.3}}`, a space file optionally as
`{"space": {...}, "fixed": {...}}`. A grid search needs finite values: choices, int ranges, or float ranges with a
step.

Every trial trains with lmforge.train.trainer.train and reports each validation loss to Optuna at its iteration;
the MedianPruner stops a trial whose loss is worse than the median of earlier trials at the same iteration. The
objective is the trial's best validation loss. Trials that complete or are pruned count toward the budget; a trial
whose settings are invalid (n_embd not divisible by n_head, say) is recorded as failed and does not.
"""

from __future__ import annotations

import difflib
import json
import math
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_path
from lmforge.settings import unwrap_optional, write_config
from lmforge.train.trainer import TrainConfig, train

SAMPLERS = ("tpe", "random", "grid")
MANAGED = ("data", "out", "progress", "resume", "overwrite")  # set by the search itself, per trial
BEST_CONFIG, BEST_RUN = "best.yaml", "best-run"


class TuneError(LmforgeError):
    """A bad search space, fixed option or study; the message names it and what is allowed."""


class TrialFailed(RuntimeError):
    """A trial that cannot give a validation loss: invalid settings, or a run that diverged before evaluating."""


# ---------------------------------------------------------------------------------------------- the space


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
        raise TuneError(f"{what}: unknown option {name!r}; {hint}TrainConfig options: "
                        f"{', '.join(n for n in types if n not in MANAGED)}")
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
            parts = [spec["low"], spec["high"]] + (["log"] if spec.get("log") else []) + (
                [spec["step"]] if spec.get("step") is not None else [])
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
    raise TuneError(f"grid search: {name} is a continuous{' log' if dist.log else ''} range; give choices "
                    f"({name}=A,B,C) or a step ({name}=LOW:HIGH:STEP)")


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
    ends = {name: dist.choices if isinstance(dist, CategoricalDistribution) else (dist.low, dist.high)
            for name, dist in space.items()}
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


# ---------------------------------------------------------------------------------------------- the study


def _count(study) -> tuple[int, int, int]:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    return states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED), states.count(TrialState.FAIL)


def recover_interrupted(study, out: Path) -> int:
    """Trials a stopped search left unfinished (still RUNNING after a kill, or failed by Ctrl-C): mark them failed,
    queue their parameters again (a grid point keeps its grid id), and drop their folders. Returns how many.

    Assumes one search process per study (a second worker's running trials would be taken for interrupted ones).
    """
    import optuna
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        # what optuna's heartbeat does to a stale trial, without waiting out a grace period
        study._storage.set_trial_user_attr(t._trial_id, "interrupted", True)
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    requeued = set(study.user_attrs.get("requeued", []))
    interrupted = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
                   if t.user_attrs.get("interrupted") and t.number not in requeued]
    for t in interrupted:  # as optuna's RetryFailedTrialCallback, less the user attributes
        study.add_trial(optuna.trial.create_trial(state=TrialState.WAITING, params=t.params,
                                                  distributions=t.distributions,
                                                  system_attrs={**t.system_attrs, "failed_trial": t.number}))
        shutil.rmtree(out / "trials" / str(t.number), ignore_errors=True)
    if interrupted:
        study.set_user_attr("requeued", sorted(requeued | {t.number for t in interrupted}))
    return len(interrupted)


def keep_best_checkpoints(study, out: Path) -> None:
    """Delete best/ and last/ of every trial folder but the best completed trial's."""
    from optuna.trial import TrialState

    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best = min(done, key=lambda t: t.value).number if done else None
    for folder in (out / "trials").glob("*"):
        if folder.name != str(best):
            for name in ("best", "last"):
                shutil.rmtree(folder / name, ignore_errors=True)


def make_sampler(kind: str, space: dict, seed: int, startup_trials: int, offset: int):
    import optuna

    if kind == "grid":  # the grid's order comes from the seed: keep it the same when resuming
        return optuna.samplers.GridSampler({n: grid_values(n, d) for n, d in space.items()}, seed=seed)
    if kind == "random":  # a resumed search continues with new draws instead of replaying the first ones
        return optuna.samplers.RandomSampler(seed=seed + offset)
    return optuna.samplers.TPESampler(seed=seed + offset, n_startup_trials=startup_trials)


def tune(data: str, out: str, space: dict, fixed: dict | None = None, trials: int = 20, sampler: str = "tpe",
         seed: int = 0, startup_trials: int = 10, prune: bool = True, pruner_startup_trials: int = 5,
         pruner_warmup_steps: int = 0, storage: str | None = None, study_name: str = "lmforge-tune",
         verbose: bool = True) -> dict:
    """Run (or resume) a search until `trials` trials have completed or been pruned; return a summary.

    `space` maps TrainConfig options to optuna distributions (parse_spec, load_space_file); `fixed` holds the
    options every trial shares. See the module docstring for what is written under `out`.
    """
    import optuna
    from optuna.distributions import distribution_to_json

    fixed = dict(fixed or {})
    if sampler not in SAMPLERS:
        raise TuneError(f"sampler {sampler!r} is not one of: {', '.join(SAMPLERS)}")
    for key, value, least in (("trials", trials, 1), ("startup_trials", startup_trials, 0),
                              ("pruner_startup_trials", pruner_startup_trials, 0),
                              ("pruner_warmup_steps", pruner_warmup_steps, 0)):
        if value < least:
            raise TuneError(f"{key}={value} must be >= {least}")
    check_settings(data, fixed, space)
    target = trials
    if sampler == "grid":  # also checks that every dimension is finite, before anything is written
        target = min(trials, math.prod(len(grid_values(n, d)) for n, d in space.items()))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out_dir / 'study.db').resolve()}"
    if "://" not in url:  # a plain path
        url = f"sqlite:///{Path(url).resolve()}"

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial_line reports each trial
    identity = {"data": str(Path(data).resolve()), "space": {n: distribution_to_json(d) for n, d in space.items()},
                "fixed": fixed}
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials, n_warmup_steps=pruner_warmup_steps)
              if prune else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=study_name, storage=url, load_if_exists=True, direction="minimize",
                                pruner=pruner)
    if study.user_attrs.get("identity") is None:
        study.set_user_attr("identity", identity)
    elif study.user_attrs["identity"] != json.loads(json.dumps(identity)):
        raise TuneError(f"study {study_name!r} in {url} was made with other data, space or fixed options "
                        f"({json.dumps(study.user_attrs['identity'])}); rerun with those, or use another out "
                        "folder or --study name")
    recovered = recover_interrupted(study, out_dir)
    study.sampler = make_sampler(sampler, space, seed, startup_trials, offset=len(study.trials))

    def run_trial(trial) -> float:
        params = {name: suggest(trial, name, dist) for name, dist in space.items()}
        cfg = TrainConfig(**{**fixed, **params, "data": data, "out": str(out_dir / "trials" / str(trial.number)),
                             "progress": False, "resume": False, "overwrite": True})

        def on_eval(iteration: int, val_loss: float) -> None:
            trial.report(val_loss, iteration)
            if trial.should_prune():
                raise optuna.TrialPruned(f"validation loss {val_loss:.4f} at iteration {iteration}")

        t0 = time.perf_counter()
        try:
            summary = train(cfg, on_eval=on_eval)
        except ValueError as e:  # TrainConfigError, or a model config error (n_embd % n_head, ...)
            trial.set_user_attr("error", str(e))
            raise TrialFailed(f"trial {trial.number}: {e}") from None
        finally:
            trial.set_user_attr("wall_s", round(time.perf_counter() - t0, 2))
        trial.set_user_attr("iters", summary["iters"])
        if not math.isfinite(summary["best_val_loss"]):
            trial.set_user_attr("error", f"no finite validation loss ({summary['stop_reason']})")
            raise TrialFailed(f"trial {trial.number}: training {summary['stop_reason']} before a finite evaluation")
        return summary["best_val_loss"]

    def objective(trial) -> float:
        try:
            return run_trial(trial)
        except KeyboardInterrupt:  # optuna fails the trial; the next run of the search queues it again
            trial.set_user_attr("interrupted", True)
            raise

    def after_trial(study, frozen) -> None:
        keep_best_checkpoints(study, out_dir)
        if verbose:
            print(trial_line(study, frozen), flush=True)

    t_start = time.perf_counter()
    complete, pruned, failed = _count(study)
    if verbose:
        print(f"study {study_name!r} in {url}: {complete + pruned}/{target} trials done"
              + (f", {recovered} interrupted trial(s) queued again" if recovered else ""), flush=True)
    while complete + pruned < target:
        waiting = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
        if sampler == "grid" and not waiting and study.sampler.is_exhausted(study):
            break  # every grid point was tried; some failed
        before = complete + pruned
        study.optimize(objective, n_trials=target - before, catch=(TrialFailed,), callbacks=[after_trial])
        complete, pruned, failed = _count(study)
        if complete + pruned == before:
            errors = [t.user_attrs.get("error") for t in study.trials if t.user_attrs.get("error")]
            last = errors[-1] if errors else "?"
            raise TuneError(f"{target - before} trial(s) in a row failed; the last said: {last}")
    summary = finish(study, out_dir, space, fixed, data)
    summary.update(study=study_name, storage=url, sampler=sampler, wall_s=round(time.perf_counter() - t_start, 2),
                   trials=complete + pruned, complete=complete, pruned=pruned, failed=failed)
    return summary


# ---------------------------------------------------------------------------------------------- results


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def trial_line(study, t) -> str:
    """One line per finished trial: its state, loss, parameters and time, with the best so far."""
    value = f"{t.value:.4f}" if t.value is not None else "-"
    where = f" at iteration {t.last_step}" if t.state.name == "PRUNED" else ""
    params = " ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    try:
        best = f" | best {study.best_value:.4f} (trial {study.best_trial.number})"
    except ValueError:  # no completed trial yet
        best = ""
    error = f" ({t.user_attrs['error']})" if t.user_attrs.get("error") else ""
    return f"trial {t.number} {t.state.name.lower()}{where}: val_loss {value}{error} | {params}{best}"


def results_table(study, space: dict) -> list[list[str]]:
    """Header + one row per finished trial: number, state, validation loss, iterations, parameters, seconds."""
    from optuna.trial import TrialState

    try:
        best = study.best_trial.number
    except ValueError:
        best = None
    rows = [["trial", "state", "val_loss", "iters", *space, "time_s"]]
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        state = t.state.name.lower()
        state = "best" if t.number == best else "interrupted" if t.user_attrs.get("interrupted") else state
        iters = t.user_attrs.get("iters", t.last_step)
        rows.append([str(t.number), state, "-" if t.value is None else f"{t.value:.4f}",
                     "-" if iters is None else str(iters), *(_fmt(t.params.get(n, "-")) for n in space),
                     _fmt(t.user_attrs.get("wall_s", "-"))])
    return rows


def print_table(rows: list[list[str]], title: str) -> None:
    """rich's table when rich is installed, else plain aligned columns."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        print(title)
        for r in rows:
            print("  ".join(c.rjust(w) if i != 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
        return
    table = Table(title=title)
    for i, name in enumerate(rows[0]):
        table.add_column(name, justify="left" if i == 1 else "right")
    for r in rows[1:]:
        table.add_row(*r, style="bold green" if r[1] == "best" else ("dim" if r[1] != "complete" else None))
    Console(width=max(100, sum(max(len(r[i]) for r in rows) + 3 for i in range(len(rows[0]))))).print(table)


def plot_study(study, png: Path) -> None:
    """Optimization history (each trial's loss, pruned ones at their last report, the best so far) and the
    fANOVA parameter importances (optuna.importance), side by side; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.trial import TrialState

    fig, (hist, imp) = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED and t.value is not None]
    if complete:
        hist.plot([t.number for t in complete], [t.value for t in complete], "o", label="complete")
    if pruned:
        hist.plot([t.number for t in pruned], [t.value for t in pruned], "x", color="tab:red",
                  label="pruned (last report)")
    if complete:
        ordered = sorted(complete, key=lambda t: t.number)
        hist.step([t.number for t in ordered], np.minimum.accumulate([t.value for t in ordered]), where="post",
                  color="tab:green", label="best so far")
    hist.set_xlabel("trial")
    hist.set_ylabel("validation loss")
    hist.set_title("optimization history")
    hist.grid(alpha=0.3)
    hist.legend()
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        importances = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except (ValueError, RuntimeError) as e:  # fewer than two completed trials, or no parameter varied
        importances, reason = {}, str(e)
    else:
        reason = "no parameter varied among completed trials"
    if importances:
        names = list(importances)[::-1]
        imp.barh(names, [importances[n] for n in names], color="tab:blue")
        imp.set_xlabel("importance (fANOVA)")
    else:
        imp.text(0.5, 0.5, f"no importances:\n{reason[:80]}", ha="center", va="center", transform=imp.transAxes)
        imp.set_axis_off()
    imp.set_title("parameter importances")
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def finish(study, out: Path, space: dict, fixed: dict, data: str) -> dict:
    """Write tune.png and best.yaml (the best trial's TrainConfig, to train into OUT/best-run); return the best
    trial's figures."""
    plot_study(study, out / "tune.png")
    try:
        best = study.best_trial
    except ValueError:
        return {"best_val_loss": None, "best_params": None, "plot": str(out / "tune.png")}
    run = out / "trials" / str(best.number)
    config = TrainConfig(**{**fixed, **best.params, "data": data, "out": str(out / BEST_RUN)})
    write_config(out / BEST_CONFIG, config, exclude=("resume", "overwrite"),
                 header=f"lmforge tune: the best of {len(study.trials)} trials, trial {best.number} (validation loss "
                        f"{best.value:.6g}, checkpoints in {run}),\nsearched: "
                        + ", ".join(f"{k}={v}" for k, v in best.params.items())
                        + f"\n`lmforge train --config {out / BEST_CONFIG}` trains it again into {out / BEST_RUN}")
    return {"best_trial": best.number, "best_val_loss": best.value, "best_params": best.params,
            "best_run": str(run), "best_config": str(out / BEST_CONFIG), "plot": str(out / "tune.png")}


@dataclass
class TuneConfig:
    """Every setting of a search."""

    data: str
    """A data folder made by `lmforge prepare`."""
    out: str
    """The search folder (study.db, trials/<n>/, tune.png, best.yaml); the same command again resumes it."""
    space: dict[str, typing.Any] = field(default_factory=dict)
    """Searched options as NAME=LOW:HIGH, NAME=LOW:HIGH:log, NAME=LOW:HIGH:STEP or NAME=A,B,C (e.g. --space
    lr=1e-4:3e-2:log n_layer=2,4,6 dropout=0:0.3); in YAML a mapping of specs, lists of choices or
    {low, high, log, step}."""
    space_file: str | None = None
    """A JSON or YAML file mapping options to specs, optionally as {space: ..., fixed: ...}."""
    fixed: dict[str, typing.Any] = field(default_factory=dict)
    """Options every trial shares, as NAME=VALUE (e.g. --fixed max_iters=500 num_threads=1); the others keep
    TrainConfig's defaults."""
    trials: int = 20
    """Trials to finish (completed + pruned, resumed ones included); a grid stops at its size."""
    sampler: typing.Literal["tpe", "random", "grid"] = "tpe"
    """tpe (Bayesian), random, or grid (every combination)."""
    seed: int = 0
    """Sampler seed."""
    startup_trials: int = 10
    """Random trials before TPE starts modelling."""
    prune: bool = True
    """Median pruning: stop a trial whose validation loss is worse than the median of earlier trials at the same
    iteration."""
    pruner_startup_trials: int = 5
    """Trials that finish before the pruner starts pruning."""
    pruner_warmup_steps: int = 0
    """Iterations of each trial before it may be pruned."""
    storage: str | None = None
    """Optuna storage URL or SQLite file. Unset: OUT/study.db."""
    study: str = "lmforge-tune"
    """The study's name in the storage."""

    def __post_init__(self) -> None:
        self.fixed = parse_fixed(self.fixed)  # typed, whether it came from flags (strings) or a YAML file


def tune_command(config: TuneConfig) -> int:
    """Search training hyperparameters with Optuna (TPE, random or grid), pruning poor trials early.

    The best trial's settings are written to OUT/best.yaml: `lmforge train --config OUT/best.yaml` trains them.
    """
    search, extra = (load_space_file(config.space_file) if config.space_file else ({}, {}))
    for name, spec in config.space.items():
        if name in search:
            raise TuneError(f"space {name}: it is already in the search space (from {config.space_file})")
        search[name] = make_distribution(name, spec, f"space spec {name}={spec}")
    settings = {**extra, **config.fixed}
    check_settings(config.data, settings, search)  # before anything is written
    Path(config.out).mkdir(parents=True, exist_ok=True)
    write_config(Path(config.out) / "tune.yaml", config, header="lmforge tune: the settings of this search "
                 "(`lmforge tune --config` reads them; the same search again resumes it)")
    summary = tune(config.data, config.out, search, settings, trials=config.trials, sampler=config.sampler,
                   seed=config.seed, startup_trials=config.startup_trials, prune=config.prune,
                   pruner_startup_trials=config.pruner_startup_trials,
                   pruner_warmup_steps=config.pruner_warmup_steps, storage=config.storage, study_name=config.study)
    import optuna

    loaded = optuna.load_study(study_name=config.study, storage=summary["storage"])
    print_table(results_table(loaded, search), f"lmforge tune: {summary['trials']} trials, {summary['pruned']} pruned")
    print(json.dumps(summary))
    return 0
