"""The training skeleton (lmforge.train.loop) without a model: budgets, evaluation, early stopping, stop requests,
and the run folder's guard, driven with plain numbers as a caller's loop would."""

import threading

import pytest

from lmforge.train.loop import Loop, RunFolderError, budget_steps, claim_run_folder, prepare_run_folder


def drive(
    loop: Loop, values: dict[int, float] | None = None, stop_at: int | None = None, stop: threading.Event | None = None
) -> list[int]:
    """Run `loop` as a caller does; evaluations read `values[step]`; returns the steps evaluated."""
    evaluated = []
    while loop.running():
        loop.step_done()
        if stop_at is not None and loop.it == stop_at:
            stop.set()
        if loop.eval_due():
            loop.observe(values[loop.it])
            evaluated.append(loop.it)
    if loop.final_eval_due():
        loop.observe(values[loop.it])
        evaluated.append(loop.it)
    return evaluated


def test_the_step_budget_is_the_smaller_of_iterations_and_epochs():
    assert budget_steps(100, None, 30) == 100
    assert budget_steps(100, 2.5, 30) == 75
    assert budget_steps(None, 0.1, 30) == 3
    assert budget_steps(None, None, 30) is None


def test_evaluates_every_interval_and_at_an_end_between_two():
    loop = Loop(max_iters=25, eval_interval=10)
    assert drive(loop, {i: 1.0 / i for i in range(1, 26)}) == [10, 20, 25]
    assert loop.stop_reason == "budget" and loop.it == 25 and loop.best == 1 / 25


def test_patience_ends_the_loop_after_evaluations_without_a_new_best():
    losses = {2: 3.0, 4: 2.0, 6: 2.5, 8: 2.0, 10: 1.0}  # 2.0 again is not an improvement
    loop = Loop(max_iters=10, eval_interval=2, patience=2)
    assert drive(loop, losses) == [2, 4, 6, 8]
    assert loop.stop_reason == "early_stop" and loop.best == 2.0 and loop.bad_evals == 2


def test_max_mode_keeps_the_highest():
    loop = Loop(max_iters=4, eval_interval=1, mode="max")
    improved = []
    while loop.running():
        loop.step_done()
        improved.append(loop.observe([0.5, 0.7, 0.6, 0.7][loop.it - 1]))
    assert improved == [True, True, False, False] and loop.best == 0.7


def test_a_stop_request_ends_after_the_current_step_without_a_final_evaluation():
    stop = threading.Event()
    loop = Loop(max_iters=100, eval_interval=10, stop=stop)
    assert drive(loop, {10: 1.0, 20: 0.5}, stop_at=13, stop=stop) == [10]
    assert loop.stop_reason == "interrupted" and loop.it == 13


def test_minutes_end_the_loop_and_a_time_only_budget_reports_its_fraction():
    loop = Loop(max_minutes=1.0, elapsed_s=59.0)
    assert loop.running() and 0.98 < loop.time_fraction() < 1.0
    loop = Loop(max_minutes=1.0, elapsed_s=60.0)  # a resumed run that had spent its minutes
    assert not loop.running() and loop.stop_reason == "minutes"
    assert Loop(max_iters=5, max_minutes=1.0).time_fraction() is None  # steps decide the schedule


def test_ranks_agree_on_elapsed_time_and_stop_requests():
    seen = []

    def agree(values):  # what torchrun's max over ranks returns when another rank was asked to stop
        seen.append(list(values))
        return [values[0], 1.0]

    loop = Loop(max_iters=10, stop=threading.Event(), agree=agree)
    assert not loop.running() and loop.stop_reason == "interrupted" and seen[0][1] == 0.0


def test_a_resumed_loop_counts_from_where_it_stood():
    loop = Loop(max_iters=10, eval_interval=5, start=7, best=0.5, bad_evals=1, patience=2)
    assert drive(loop, {10: 0.6}) == [10]
    assert loop.stop_reason == "early_stop" and loop.best == 0.5


def test_the_run_folder_guard(tmp_path):
    outputs = ("best", "metrics.jsonl")
    claim_run_folder(tmp_path / "new", outputs)  # a folder that does not exist yet
    (tmp_path / "mine.txt").write_text("x")
    claim_run_folder(tmp_path, outputs)  # other files lose nothing
    (tmp_path / "metrics.jsonl").write_text("{}")
    with pytest.raises(RunFolderError, match="--resume.*--overwrite") as info:
        claim_run_folder(tmp_path, outputs)
    assert info.value.param == "out"
    with pytest.raises(RunFolderError, match="start over with --overwrite") as info:
        claim_run_folder(tmp_path, outputs, can_resume=False)
    assert "--resume" not in str(info.value)
    claim_run_folder(tmp_path, outputs, resume=True)
    claim_run_folder(tmp_path, outputs, overwrite=True)
    prepare_run_folder(tmp_path, outputs, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]
