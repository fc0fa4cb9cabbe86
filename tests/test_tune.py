"""`lmforge tune` on a tiny char corpus: grid/random/TPE sampling, pruning, resuming a killed search, the outputs,
and clear errors for bad search spaces."""

import _thread
import itertools
import json
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.settings import read_config
from lmforge.train.space import TuneError, grid_values, load_space_file, parse_fixed, parse_spec
from lmforge.train.trainer import TrainConfig
from lmforge.train.tune import tune

# a one-layer 32-wide model, context 16, 20 iterations evaluated once at the end (or at 10 and 20, for pruning):
# each evaluation also writes checkpoints and a loss plot, most of a trial's time
FIXED = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    batch_size=8,
    max_iters=20,
    eval_interval=20,
    eval_iters=2,
    warmup_iters=2,
    log_interval=10,
    num_threads=1,
)


def fixed(*searched, **overrides) -> dict:
    """FIXED without the searched options, with overrides."""
    return {**{k: v for k, v in FIXED.items() if k not in searched}, **overrides}


def space(*specs):
    return dict(parse_spec(s) for s in specs)


def finished(out, states=("COMPLETE", "PRUNED")):
    study = optuna.load_study(study_name="lmforge-tune", storage=f"sqlite:///{out / 'study.db'}")
    return [t for t in study.trials if t.state.name in states]


def evals(run: Path) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["val_loss"] for r in lines if "val_loss" in r}


def test_grid_runs_every_combination_once(data_dir, tmp_path):
    result = tune(
        data_dir,
        str(tmp_path),
        space("lr=3e-3,1e-4", "warmup_iters=0:4:4"),
        fixed("warmup_iters"),
        trials=10,
        sampler="grid",
        prune=False,
        verbose=False,
    )
    trials = finished(tmp_path)
    assert result["trials"] == len(trials) == 4  # the grid's size, not --trials
    assert sorted((t.params["lr"], t.params["warmup_iters"]) for t in trials) == sorted(
        itertools.product([3e-3, 1e-4], [0, 4])
    )
    for t in trials:  # the sampled values reached the run, and the objective is the run's best validation loss
        args = read_config(TrainConfig, tmp_path / "trials" / str(t.number) / "train.yaml")
        assert (args["lr"], args["warmup_iters"]) == (t.params["lr"], t.params["warmup_iters"])
        assert t.value == pytest.approx(min(evals(tmp_path / "trials" / str(t.number)).values()))
    assert grid_values("dropout", parse_spec("dropout=0:0.1:0.05")[1]) == [0.0, 0.05, 0.1]
    assert grid_values("n_layer", parse_spec("n_layer=1:3")[1]) == [1, 2, 3]


def test_median_pruner_stops_a_worse_trial(data_dir, tmp_path):
    # lr 1e-6 barely moves the loss: once a good trial has finished, a trial that far behind it is pruned
    result = tune(
        data_dir,
        str(tmp_path),
        space("lr=1e-2,3e-3,1e-5,1e-6"),
        fixed(eval_interval=10),
        trials=4,
        sampler="grid",
        pruner_startup_trials=1,
        verbose=False,
    )
    trials = finished(tmp_path)
    pruned = [t for t in trials if t.state.name == "PRUNED"]
    assert result["pruned"] == len(pruned) >= 1
    for t in pruned:
        run = tmp_path / "trials" / str(t.number)
        assert sorted(evals(run)) == [10] and t.last_step == 10  # stopped at its first evaluation
        earlier = [u.intermediate_values[10] for u in trials if u.state.name == "COMPLETE" and u.number < t.number]
        assert t.value == evals(run)[10] > statistics.median(earlier)
        assert not (run / "best").exists() and not (run / "last").exists()


def test_random_sampling_stays_in_the_space(data_dir, tmp_path):
    tune(
        data_dir,
        str(tmp_path),
        space("lr=1e-4:1e-2:log", "warmup_iters=0:10:5", "dropout=0:0.2"),
        fixed("warmup_iters"),
        trials=3,
        sampler="random",
        seed=3,
        prune=False,
        verbose=False,
    )
    trials = finished(tmp_path)
    assert len(trials) == 3 and len({t.params["lr"] for t in trials}) == 3
    for t in trials:
        assert 1e-4 <= t.params["lr"] <= 1e-2 and 0 <= t.params["dropout"] <= 0.2
        assert t.params["warmup_iters"] in (0, 5, 10)
        args = read_config(TrainConfig, tmp_path / "trials" / str(t.number) / "train.yaml")
        assert args["dropout"] == t.params["dropout"] and args["max_iters"] == 20


def test_tpe_command_writes_table_plot_and_best_config(data_dir, tmp_path, capsys):
    out = tmp_path / "search"
    code = main(
        [
            "tune",
            data_dir,
            str(out),
            "--space",
            "lr=1e-4:1e-2:log",
            "label_smoothing=0:0.1",
            "--fixed",
            *(f"{k}={v}" for k, v in fixed(eval_interval=10).items()),
            "--trials",
            "3",
            "--startup-trials",
            "2",
            "--pruner-startup-trials",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["trials"] == 3 and summary["sampler"] == "tpe"
    assert "val_loss" in printed and "best" in printed and "label_smoothing" in printed  # the results table
    assert (out / "tune.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = read_config(TrainConfig, out / "best.yaml")
    complete = [t for t in finished(out) if t.state.name == "COMPLETE"]
    winner = min(complete, key=lambda t: t.value)
    assert summary["best_trial"] == winner.number and summary["best_val_loss"] == winner.value
    assert summary["best_params"] == winner.params
    assert best["lr"] == winner.params["lr"] and best["label_smoothing"] == winner.params["label_smoothing"]
    assert best["n_embd"] == 32 and best["out"] == str(out / "best-run")
    # only the best trial keeps checkpoints, and they load
    with_checkpoints = [p.name for p in (out / "trials").iterdir() if (p / "best").exists() or (p / "last").exists()]
    assert with_checkpoints == [str(winner.number)]
    model, _ = load_model(summary["best_run"])
    assert model.config.n_embd == 32


def wait_for_a_training_trial(out: Path, alive=lambda: True) -> None:
    """Return once one trial is complete and another is training (its lr drawn), reading the SQLite file."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and alive():
        if (out / "study.db").exists():
            try:
                with sqlite3.connect(out / "study.db", timeout=5) as db:
                    states = [
                        row[0]
                        for row in db.execute(
                            "SELECT state FROM trials WHERE trial_id IN (SELECT trial_id FROM trial_params)"
                        )
                    ]
            except sqlite3.OperationalError:  # tables not created yet
                states = []
            if "COMPLETE" in states and "RUNNING" in states:
                return
        time.sleep(0.05)
    raise AssertionError("no trial was training to interrupt")


def check_resumed(data_dir, out: Path, cut_state: str) -> None:
    """Interrupt, then resume in this process: earlier trials kept, the cut one run again, 3 finished in all."""
    before = {t.number: (t.params, t.value) for t in finished(out)}
    cut = finished(out, states=("RUNNING", "FAIL"))
    assert 1 <= len(before) < 3 and [t.state.name for t in cut] == [cut_state]

    tune(data_dir, str(out), space("lr=1e-3:1e-2:log"), FIXED, trials=3, sampler="random", prune=False, verbose=False)
    trials = finished(out, states=("COMPLETE", "PRUNED", "FAIL"))
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 3  # only the remaining trials ran
    assert {t.number: (t.params, t.value) for t in done if t.number in before} == before
    failed = [t for t in trials if t.state.name == "FAIL"]
    assert [t.number for t in failed] == [t.number for t in cut] and failed[0].user_attrs["interrupted"]
    assert not (out / "trials" / str(failed[0].number)).exists()  # its partial run folder is gone
    assert [u.number > failed[0].number for u in done if u.params == failed[0].params] == [True]  # run again
    assert all((out / "trials" / str(t.number) / "metrics.jsonl").exists() for t in done)
    with pytest.raises(TuneError, match="other data, space or fixed options"):  # a different search, same study
        tune(data_dir, str(out), space("lr=1e-4:1e-3:log"), FIXED, trials=3, verbose=False)


@pytest.mark.slow  # kills and restarts a search in subprocesses
def test_killed_search_resumes_and_keeps_earlier_trials(data_dir, tmp_path):
    out = tmp_path / "search"
    cmd = [
        sys.executable,
        "-m",
        "lmforge",
        "tune",
        data_dir,
        str(out),
        "--space",
        "lr=1e-3:1e-2:log",
        "--fixed",
        *(f"{k}={v}" for k, v in FIXED.items()),
        "--trials",
        "3",
        "--sampler",
        "random",
        "--no-prune",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_a_training_trial(out, alive=lambda: proc.poll() is None)
    finally:
        proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    check_resumed(data_dir, out, cut_state="RUNNING")  # a killed process leaves its trial running


def test_ctrl_c_search_resumes_and_keeps_earlier_trials(data_dir, tmp_path):
    out = tmp_path / "search"
    ctrl_c = threading.Thread(target=lambda: (wait_for_a_training_trial(out), _thread.interrupt_main()))
    # a shell that backgrounds pytest makes it ignore SIGINT; Ctrl-C's usual handler is needed here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        ctrl_c.start()
        with pytest.raises(KeyboardInterrupt):
            tune(
                data_dir,
                str(out),
                space("lr=1e-3:1e-2:log"),
                FIXED,
                trials=3,
                sampler="random",
                prune=False,
                verbose=False,
            )
        ctrl_c.join()
    finally:
        signal.signal(signal.SIGINT, previous)
    check_resumed(data_dir, out, cut_state="FAIL")  # optuna fails a trial that raised KeyboardInterrupt


@pytest.mark.parametrize(
    "spec, message",
    [
        ("lr", "expected NAME=LOW:HIGH"),
        ("lrr=1e-4:1e-2", "unknown option 'lrr'; did you mean 'lr'?"),
        ("lr=1e-2:1e-4", "LOW must be less than HIGH"),
        ("lr=0:1e-2:log", "a log range needs LOW > 0"),
        ("lr=1e-4:abc", "cannot read 'abc' as a float for lr"),
        ("n_layer=1.5:4", "cannot read '1.5' as an int for n_layer"),
        ("optimizer=1:2", "optimizer is a str option; give choices"),
        ("n_layer=2,,4", "empty choice"),
        ("n_layer=2,2", "repeated choices"),
        ("lr=1e-4:1e-2:0", "STEP must be in"),
        ("out=a,b", "'out' is set by the search itself"),
    ],
)
def test_bad_space_specs_are_named(spec, message):
    with pytest.raises(TuneError) as info:
        parse_spec(spec)
    assert message in str(info.value) and repr(spec) in str(info.value)


def test_bad_settings_fail_before_training(data_dir, tmp_path, capsys):
    def run(*args):
        return main(["tune", data_dir, str(tmp_path / "out"), *args])

    assert run("--space", "dropout=0:1.5", "--fixed", "max_iters=5") == 1
    assert "search space dropout: dropout=1.5 must be in [0, 1)" in capsys.readouterr().err
    assert run("--space", "lr=1e-4:1e-2:log", "--sampler", "grid", "--fixed", "max_iters=5") == 1
    assert "grid search: lr is a continuous log range" in capsys.readouterr().err
    assert run("--space", "lr=1e-4:1e-2") == 1
    assert "no budget" in capsys.readouterr().err
    assert run("--space", "lr=1e-4:1e-2", "--fixed", "lr=1e-3", "max_iters=5") == 1
    assert "lr is both searched and fixed" in capsys.readouterr().err
    assert run("--fixed", "max_iters=5") == 1
    assert "empty search space" in capsys.readouterr().err
    with pytest.raises(TuneError, match="expected NAME=VALUE"):
        parse_fixed(["max_iters"])
    with pytest.raises(TuneError, match="compile takes true or false"):
        parse_fixed(["compile=maybe"])
    assert not (tmp_path / "out" / "trials").exists()


def test_space_file_json_and_yaml(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "space:\n  lr: 1e-4:1e-2:log\n  n_layer: [2, 4]\n  dropout: {low: 0, high: 0.3}\n"
        "fixed:\n  max_iters: 100\n  bias: false\n"
    )
    (tmp_path / "s.json").write_text(json.dumps({"lr": "1e-4:1e-2:log", "n_layer": "2,4", "dropout": "0:0.3"}))
    yaml_space, yaml_fixed = load_space_file(str(tmp_path / "s.yaml"))
    json_space, json_fixed = load_space_file(str(tmp_path / "s.json"))
    assert yaml_space == json_space == space("lr=1e-4:1e-2:log", "n_layer=2,4", "dropout=0:0.3")
    assert yaml_fixed == {"max_iters": 100, "bias": False} and json_fixed == {}
    (tmp_path / "bad.json").write_text('{"lr": "1e-4:1e-2:log",}')
    with pytest.raises(TuneError, match="bad.json: cannot parse"):
        load_space_file(str(tmp_path / "bad.json"))
    (tmp_path / "bad.yaml").write_text("n_layer: 2.5\n")
    with pytest.raises(TuneError, match="n_layer takes an int"):
        load_space_file(str(tmp_path / "bad.yaml"))


def test_tune_then_train_with_its_best_config_trains_the_best_trial_again(data_dir, tmp_path, capsys):
    out = tmp_path / "search"
    assert (
        main(
            [
                "tune",
                data_dir,
                str(out),
                "--space",
                "lr=3e-3,1e-2",
                "--fixed",
                *(f"{k}={v}" for k, v in fixed(eval_interval=10).items()),
                "--trials",
                "2",
                "--sampler",
                "grid",
                "--no-prune",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["train", "--config", str(out / "best.yaml"), "--no-progress"]) == 0  # as written, no other flag
    retrained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    trial = out / "trials" / str(summary["best_trial"])
    assert evals(out / "best-run") == evals(trial) and sorted(evals(trial)) == [10, 20]
    assert retrained["best_val_loss"] == summary["best_val_loss"]
    assert read_config(TrainConfig, out / "best-run" / "train.yaml") == {
        **read_config(TrainConfig, out / "best.yaml"),
        "progress": False,
    }
