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

import json
import math
import shutil
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

from lmforge.settings import write_config
from lmforge.train.space import (
    TuneError,
    check_settings,
    grid_values,
    load_space_file,
    make_distribution,
    parse_fixed,
    suggest,
)
from lmforge.train.trainer import TrainConfig, train
from lmforge.train.tune_report import plot_study, print_table, results_table, trial_line

SAMPLERS = ("tpe", "random", "grid")
BEST_CONFIG, BEST_RUN = "best.yaml", "best-run"


class TrialFailed(RuntimeError):
    """A trial that cannot give a validation loss: invalid settings, or a run that diverged before evaluating."""


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
    interrupted = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if t.user_attrs.get("interrupted") and t.number not in requeued
    ]
    for t in interrupted:  # as optuna's RetryFailedTrialCallback, less the user attributes
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.WAITING,
                params=t.params,
                distributions=t.distributions,
                system_attrs={**t.system_attrs, "failed_trial": t.number},
            )
        )
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


def tune(
    data: str,
    out: str,
    space: dict,
    fixed: dict | None = None,
    trials: int = 20,
    sampler: str = "tpe",
    seed: int = 0,
    startup_trials: int = 10,
    prune: bool = True,
    pruner_startup_trials: int = 5,
    pruner_warmup_steps: int = 0,
    storage: str | None = None,
    study_name: str = "lmforge-tune",
    verbose: bool = True,
) -> dict:
    """Run (or resume) a search until `trials` trials have completed or been pruned; return a summary.

    `space` maps TrainConfig options to optuna distributions (parse_spec, load_space_file); `fixed` holds the
    options every trial shares. See the module docstring for what is written under `out`.
    """
    import optuna
    from optuna.distributions import distribution_to_json

    fixed = dict(fixed or {})
    if sampler not in SAMPLERS:
        raise TuneError(f"sampler {sampler!r} is not one of: {', '.join(SAMPLERS)}")
    for key, value, least in (
        ("trials", trials, 1),
        ("startup_trials", startup_trials, 0),
        ("pruner_startup_trials", pruner_startup_trials, 0),
        ("pruner_warmup_steps", pruner_warmup_steps, 0),
    ):
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
    identity = {
        "data": str(Path(data).resolve()),
        "space": {n: distribution_to_json(d) for n, d in space.items()},
        "fixed": fixed,
    }
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials, n_warmup_steps=pruner_warmup_steps)
        if prune
        else optuna.pruners.NopPruner()
    )
    study = optuna.create_study(
        study_name=study_name, storage=url, load_if_exists=True, direction="minimize", pruner=pruner
    )
    if study.user_attrs.get("identity") is None:
        study.set_user_attr("identity", identity)
    elif study.user_attrs["identity"] != json.loads(json.dumps(identity)):
        raise TuneError(
            f"study {study_name!r} in {url} was made with other data, space or fixed options "
            f"({json.dumps(study.user_attrs['identity'])}); rerun with those, or use another out "
            "folder or --study name"
        )
    recovered = recover_interrupted(study, out_dir)
    study.sampler = make_sampler(sampler, space, seed, startup_trials, offset=len(study.trials))

    def run_trial(trial) -> float:
        params = {name: suggest(trial, name, dist) for name, dist in space.items()}
        cfg = TrainConfig(
            **{
                **fixed,
                **params,
                "data": data,
                "out": str(out_dir / "trials" / str(trial.number)),
                "progress": False,
                "resume": False,
                "overwrite": True,
            }
        )

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
        print(
            f"study {study_name!r} in {url}: {complete + pruned}/{target} trials done"
            + (f", {recovered} interrupted trial(s) queued again" if recovered else ""),
            flush=True,
        )
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
    summary.update(
        study=study_name,
        storage=url,
        sampler=sampler,
        wall_s=round(time.perf_counter() - t_start, 2),
        trials=complete + pruned,
        complete=complete,
        pruned=pruned,
        failed=failed,
    )
    return summary


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
    write_config(
        out / BEST_CONFIG,
        config,
        exclude=("resume", "overwrite"),
        header=f"lmforge tune: the best of {len(study.trials)} trials, trial {best.number} (validation loss "
        f"{best.value:.6g}, checkpoints in {run}),\nsearched: "
        + ", ".join(f"{k}={v}" for k, v in best.params.items())
        + f"\n`lmforge train --config {out / BEST_CONFIG}` trains it again into {out / BEST_RUN}",
    )
    return {
        "best_trial": best.number,
        "best_val_loss": best.value,
        "best_params": best.params,
        "best_run": str(run),
        "best_config": str(out / BEST_CONFIG),
        "plot": str(out / "tune.png"),
    }


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
    search, extra = load_space_file(config.space_file) if config.space_file else ({}, {})
    for name, spec in config.space.items():
        if name in search:
            raise TuneError(f"space {name}: it is already in the search space (from {config.space_file})")
        search[name] = make_distribution(name, spec, f"space spec {name}={spec}")
    settings = {**extra, **config.fixed}
    check_settings(config.data, settings, search)  # before anything is written
    Path(config.out).mkdir(parents=True, exist_ok=True)
    write_config(
        Path(config.out) / "tune.yaml",
        config,
        header="lmforge tune: the settings of this search "
        "(`lmforge tune --config` reads them; the same search again resumes it)",
    )
    summary = tune(
        config.data,
        config.out,
        search,
        settings,
        trials=config.trials,
        sampler=config.sampler,
        seed=config.seed,
        startup_trials=config.startup_trials,
        prune=config.prune,
        pruner_startup_trials=config.pruner_startup_trials,
        pruner_warmup_steps=config.pruner_warmup_steps,
        storage=config.storage,
        study_name=config.study,
    )
    import optuna

    loaded = optuna.load_study(study_name=config.study, storage=summary["storage"])
    print_table(results_table(loaded, search), f"lmforge tune: {summary['trials']} trials, {summary['pruned']} pruned")
    print(json.dumps(summary))
    return 0
