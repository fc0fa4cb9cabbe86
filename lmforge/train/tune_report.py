"""What `lmforge tune` shows of a study: one line per finished trial, the results table (rich's, or plain
columns) and tune.png (the optimization history beside the fANOVA parameter importances)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lmforge.fsutil import atomic_path


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
        rows.append(
            [
                str(t.number),
                state,
                "-" if t.value is None else f"{t.value:.4f}",
                "-" if iters is None else str(iters),
                *(_fmt(t.params.get(n, "-")) for n in space),
                _fmt(t.user_attrs.get("wall_s", "-")),
            ]
        )
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
        hist.plot(
            [t.number for t in pruned], [t.value for t in pruned], "x", color="tab:red", label="pruned (last report)"
        )
    if complete:
        ordered = sorted(complete, key=lambda t: t.number)
        hist.step(
            [t.number for t in ordered],
            np.minimum.accumulate([t.value for t in ordered]),
            where="post",
            color="tab:green",
            label="best so far",
        )
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
