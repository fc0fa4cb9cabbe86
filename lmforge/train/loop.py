"""The skeleton every training loop in lmforge shares: pre-training (trainer), fine-tuning (apps.finetune) and
classification (apps.classify) alike.

    loop = Loop(max_iters=budget_steps(...), max_minutes=..., eval_interval=..., patience=..., stop=stop)
    while loop.running():           # False once the budget (steps, epochs or minutes) is spent, patience has run
        ...one step...              # out, or a stop was asked for (Ctrl-C / SIGTERM: `stop_on_signals`)
        loop.step_done()
        if loop.eval_due():
            if loop.observe(evaluate()):   # True for a new best: keep its state (in memory, or a best/ checkpoint)
                ...
    if loop.final_eval_due():       # the budget ran out between two evaluations: the end is often the best
        ...

`loop.stop_reason` says why it ended: budget, minutes, early_stop, interrupted, or one the caller gives with
`loop.end(reason)` (diverged). A "step" is whatever the caller counts: an optimizer step, or an epoch.

The run folder: `claim_run_folder` refuses to start a run over another one's work unless told to resume or to
overwrite it, and clears what a killed run left behind (half-written checkpoints).
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lmforge.errors import LmforgeError


class RunFolderError(LmforgeError):
    """A run folder that holds another run's work; the message says how to keep or replace it."""


def budget_steps(max_iters: int | None, epochs: float | None, steps_per_epoch: int) -> int | None:
    """The step budget: `max_iters` or `epochs` passes of `steps_per_epoch`, whichever is less; None if neither."""
    budgets = [b for b in (max_iters, epochs and math.ceil(epochs * steps_per_epoch)) if b]
    return min(budgets) if budgets else None


class Loop:
    """Where a training loop stands: steps done, the best evaluation so far, and why it stopped.

    Args:
        max_iters: steps to take in all (resumed ones included); None: no step budget.
        max_minutes: wall-clock budget, the minutes of earlier sessions (`elapsed_s`) included.
        eval_interval: `eval_due` every this many steps (0: never; the caller evaluates when it likes).
        patience: stop after this many evaluations in a row without a new best (None: never).
        mode: "min" (a loss) or "max" (an accuracy): which way is better.
        start, best, bad_evals, elapsed_s: where a resumed run stood.
        stop: an Event that ends the loop at the next `running()` when set (`stop_on_signals`).
        agree: under torchrun, the element-wise maximum over ranks of a list of floats, so that every rank
            sees the same elapsed time and stop request and stops at the same step.
    """

    def __init__(
        self,
        *,
        max_iters: int | None = None,
        max_minutes: float | None = None,
        eval_interval: int = 1,
        patience: int | None = None,
        mode: str = "min",
        start: int = 0,
        best: float | None = None,
        bad_evals: int = 0,
        elapsed_s: float = 0.0,
        stop: threading.Event | None = None,
        agree: Callable[[list[float]], list[float]] | None = None,
    ):
        self.max_iters, self.max_minutes, self.eval_interval, self.patience = (
            max_iters,
            max_minutes,
            eval_interval,
            patience,
        )
        self.mode, self.it, self.start, self.bad_evals = mode, start, start, bad_evals
        self.best = best if best is not None else (math.inf if mode == "min" else -math.inf)
        self.elapsed_before, self.stop, self.agree = elapsed_s, stop, agree
        self.evaluated_at, self.stop_reason = start, None
        self.t0 = time.perf_counter()
        self.elapsed_at_check = elapsed_s

    def elapsed(self) -> float:
        """Seconds of training, earlier sessions included."""
        return self.elapsed_before + time.perf_counter() - self.t0

    def running(self) -> bool:
        """Whether to take another step; when not, `stop_reason` says why."""
        if self.stop_reason is not None:
            return False
        if self.max_iters is not None and self.it >= self.max_iters:
            self.stop_reason = "budget"
            return False
        if self.max_minutes is not None or self.stop is not None:
            elapsed, stop = self.elapsed(), float(self.stop is not None and self.stop.is_set())
            if self.agree is not None:
                elapsed, stop = self.agree([elapsed, stop])
            self.elapsed_at_check = elapsed
            if self.max_minutes is not None and elapsed >= 60 * self.max_minutes:
                self.stop_reason = "minutes"
            elif stop:
                self.stop_reason = "interrupted"
        return self.stop_reason is None

    def time_fraction(self) -> float | None:
        """The share of the minutes spent at the last `running()` check, when minutes are the only budget (a
        schedule then decays over the time instead of over steps); None otherwise."""
        if self.max_iters is not None or self.max_minutes is None:
            return None
        return self.elapsed_at_check / (60 * self.max_minutes)

    def step_done(self) -> None:
        self.it += 1

    def eval_due(self) -> bool:
        return self.eval_interval > 0 and self.it % self.eval_interval == 0

    def observe(self, value: float) -> bool:
        """Record an evaluation at the current step; True when it is the best so far. After `patience`
        evaluations in a row without a new best the loop ends (early_stop)."""
        improved = value < self.best if self.mode == "min" else value > self.best
        if improved:
            self.best, self.bad_evals = value, 0
        else:
            self.bad_evals += 1
        self.evaluated_at = self.it
        if self.patience is not None and self.bad_evals >= self.patience:
            self.stop_reason = "early_stop"
        return improved

    def end(self, reason: str) -> None:
        self.stop_reason = reason

    def final_eval_due(self) -> bool:
        """The budget ran out after steps no evaluation has seen."""
        return self.evaluated_at != self.it and self.stop_reason in ("budget", "minutes")


# ---------------------------------------------------------------------------------------------- stopping


class StopRequest(threading.Event):
    """Set by a signal; `signum` says which (the command exits with 128 + signum, as a shell expects)."""

    signum: int | None = None


@contextlib.contextmanager
def stop_on_signals(what: str = "training") -> Iterator[StopRequest]:
    """A StopRequest that the first Ctrl-C (SIGINT) or SIGTERM sets instead of killing the process: the loop ends
    after its current step and saves where it is. A second Ctrl-C raises KeyboardInterrupt as usual. Signal
    handlers can only be set in the main thread; elsewhere the request is never set."""
    stop = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    quiet = os.environ.get("RANK", "0") != "0"  # under torchrun, one message, not one per process

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.signum = signum
        stop.set()
        if not quiet:
            print(
                f"\n{signal.Signals(signum).name}: {what} stops after this step and saves it "
                "(Ctrl-C again to quit at once, saving nothing)",
                file=sys.stderr,
                flush=True,
            )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------------------------------------- the run folder


def claim_run_folder(
    out: str | os.PathLike,
    outputs: tuple[str, ...],
    *,
    resume: bool = False,
    overwrite: bool = False,
    can_resume: bool = True,
) -> None:
    """Refuse to start a run in a folder that holds an earlier run's `outputs` (or, with no `outputs` named,
    anything: the folder is the output) unless resuming it or told to overwrite it. Files that are not a run's
    outputs lose nothing and do not count. Reads only: under torchrun every rank calls it before any writes."""
    out = Path(out)
    if resume or overwrite or not out.is_dir():
        return
    found = sorted(p.name for p in out.iterdir() if not outputs or p.name in outputs)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        keep = "continue that run with --resume, or " if can_resume else ""
        replaced = f"deletes {', '.join(outputs)} there" if outputs else "replaces it"
        raise RunFolderError(
            f"{out} holds an earlier run ({shown}): {keep}start over with --overwrite (which "
            f"{replaced}), or choose another folder",
            param="out",
        )


def prepare_run_folder(out: str | os.PathLike, outputs: tuple[str, ...], *, overwrite: bool = False) -> None:
    """Make the run folder ready to write: with `overwrite` the previous run's `outputs` go; in any case what a
    killed run left half-written goes (temporary checkpoint folders whose writer is not alive)."""
    from lmforge.checkpoint import clean_stale_folders

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean_stale_folders(out)
    if overwrite:
        for name in outputs:
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
