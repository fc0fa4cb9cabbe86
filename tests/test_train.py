"""The training loop on a tiny char corpus: it learns, resumes exactly, stops when told, writes its run folder, and
never loses a run's work (an earlier run, Ctrl-C / SIGTERM, a killed checkpoint write, an impossible setting)."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmforge.checkpoint import load_model, load_train_state
from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.settings import read_config
from lmforge.train.config import build_model_config
from lmforge.train.optim import OptimConfigError, Schedule, make_optimizer, param_groups
from lmforge.train.trainer import TrainConfig, TrainConfigError, train


def tiny(data_dir, out, **kw) -> TrainConfig:
    """A one-layer 32-wide model with context 16: a few ms per iteration."""
    settings = dict(
        data=data_dir,
        out=str(out),
        preset="gpt-nano",
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=16,
        batch_size=8,
        lr=3e-3,
        warmup_iters=5,
        min_lr=3e-4,
        eval_interval=20,
        eval_iters=2,
        log_interval=1,
        progress=False,
        num_threads=1,
    )
    settings.update(kw)
    return TrainConfig(**settings)


def losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in lines if "loss" in r}


def test_loss_falls_and_run_folder_is_complete(data_dir, tmp_path):
    config = tiny(data_dir, tmp_path / "run", max_iters=60)
    summary = train(config)
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 61))
    assert sum(list(curve.values())[-5:]) / 5 < sum(list(curve.values())[:5]) / 5 - 0.8
    assert summary["iters"] == 60 and summary["stop_reason"] == "budget"
    for name in ("metrics.jsonl", "loss.png", "train.yaml", "best/config.json", "last/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert TrainConfig(**read_config(TrainConfig, tmp_path / "run" / "train.yaml")) == config  # the settings it ran
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tok = load_model(tmp_path / "run" / "last")
    assert tok is not None and tok.decode(tok.encode("fox")) == "fox"
    state = load_train_state(tmp_path / "run" / "last")
    assert state["iter"] == 60 and set(state["rng"]) == {"torch", "numpy", "python", "data"}
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in metrics if "val_loss" in line]
    assert [e["iter"] for e in evals] == [20, 40, 60]
    assert evals[-1]["val_bpc"] == pytest.approx(evals[-1]["val_loss"] / math.log(2))
    best, _ = load_model(tmp_path / "run" / "best")
    assert best.config.vocab_size == json.loads(open(f"{data_dir}/meta.json").read())["vocab_size"]


@pytest.mark.parametrize("batch_mode, dropout", [("random", 0.1), ("sequential", 0.0)])
def test_resume_equals_uninterrupted(data_dir, tmp_path, batch_mode, dropout):
    common = dict(batch_mode=batch_mode, dropout=dropout, lr_decay_iters=30, eval_interval=10, grad_accum=2)
    full = train(tiny(data_dir, tmp_path / "full", max_iters=30, **common))
    train(tiny(data_dir, tmp_path / "part", max_iters=15, **common))
    resumed = train(tiny(data_dir, tmp_path / "part", max_iters=30, resume=True, **common))
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert sorted(a) == sorted(b) == list(range(1, 31))
    for it in a:
        assert b[it] == pytest.approx(a[it], abs=1e-6), it
    assert resumed["best_val_loss"] == pytest.approx(full["best_val_loss"], abs=1e-6)


def test_early_stopping_stops(data_dir, tmp_path):
    # lr far too high: validation loss stops improving, and patience 2 ends the run long before its budget
    summary = train(
        tiny(
            data_dir,
            tmp_path / "run",
            max_iters=1000,
            lr=5.0,
            min_lr=0.0,
            warmup_iters=0,
            grad_clip=0.0,
            eval_interval=5,
            patience=2,
            log_interval=5,
        )
    )
    assert summary["stop_reason"] in ("early_stop", "diverged")
    assert summary["iters"] < 1000


def test_minutes_budget_stops(data_dir, tmp_path):
    summary = train(
        tiny(data_dir, tmp_path / "run", max_minutes=0.02, schedule="constant", eval_interval=10_000, log_interval=50)
    )
    assert summary["stop_reason"] == "minutes"
    assert 0 < summary["iters"] and summary["wall_s"] < 10


def test_epochs_budget_with_sequential_batches(data_dir, tmp_path):
    summary = train(
        tiny(
            data_dir,
            tmp_path / "run",
            batch_mode="sequential",
            epochs=2,
            eval_interval=0,
            optimizer="sgd",
            lr=1.0,
            schedule="constant",
            warmup_iters=0,
        )
    )
    assert summary["iters"] == 2 * summary["iters_per_epoch"]
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(line) for line in metrics if "val_loss" in line]
    assert [e["iter"] for e in evals] == [summary["iters_per_epoch"], 2 * summary["iters_per_epoch"]]


def test_plateau_divides_lr_by_four():
    s = Schedule("plateau", lr=5.0)
    assert not s.observe(3.0) and s.lr_at(100) == 5.0
    assert not s.observe(2.5) and s.lr_at(100) == 5.0  # improved: unchanged
    assert s.observe(2.6) and s.lr_at(100) == 1.25  # stalled: /4
    assert s.observe(2.5) and s.lr_at(100) == 0.3125  # equal is not an improvement, as in the example
    restored = Schedule("plateau", lr=5.0)
    restored.load_state_dict(s.state_dict())
    assert restored.lr_at(100) == s.lr_at(100) and restored.best == 2.5


def test_sgd_plateau_in_a_run(data_dir, tmp_path):
    # a large clipped SGD rate makes the validation loss bounce; each time it fails to improve, lr /= 4
    train(
        tiny(
            data_dir,
            tmp_path / "run",
            optimizer="sgd",
            lr=20.0,
            schedule="plateau",
            warmup_iters=0,
            grad_clip=0.25,
            max_iters=40,
            eval_interval=2,
            weight_decay=0.0,
        )
    )
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["iter"]: r["lr"] for r in records if "lr" in r}
    reduced = [r for r in records if "lr_reduced_to" in r]
    assert reduced
    for r in reduced:
        assert r["lr_reduced_to"] == pytest.approx(lrs[r["iter"]] / 4)
        if r["iter"] + 1 in lrs:
            assert lrs[r["iter"] + 1] == pytest.approx(r["lr_reduced_to"])


def test_cosine_schedule_matches_nanogpt():
    s = Schedule("cosine", lr=1e-3, warmup_iters=100, decay_iters=2000, min_lr=1e-4)

    def nanogpt_get_lr(it):  # nanoGPT train.py get_lr (its warmup is (it + 1) / warmup_iters too)
        if it < 100:
            return 1e-3 * (it + 1) / 100
        if it > 2000:
            return 1e-4
        ratio = (it - 100) / (2000 - 100)
        return 1e-4 + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (1e-3 - 1e-4)

    for it in (0, 50, 99, 100, 500, 1050, 1999, 2000, 2500):
        assert s.lr_at(it) == pytest.approx(nanogpt_get_lr(it), rel=1e-12)


def test_adamw_groups_decay_only_matrices():
    model = Transformer(ModelConfig.from_name("gpt-nano", n_layer=2))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert decayed == {
        n for n, p in model.named_parameters() if p.dim() == 2 and not n.startswith(("tok_emb", "pos_emb"))
    }
    assert "blocks.0.attn.qkv.weight" in decayed and "blocks.1.mlp.proj.weight" in decayed
    assert not any("norm" in n or n.endswith("bias") or "emb" in n for n in decayed)
    assert all(p is not model.lm_head.weight for p in decay["params"])  # tied to tok_emb: not decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    opt = make_optimizer(model, "adamw", 1e-3, 0.1)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]


def test_bad_options_name_the_setting(data_dir, tmp_path):
    with pytest.raises(TrainConfigError, match="lr=-0.1"):
        train(tiny(data_dir, tmp_path / "r", max_iters=5, lr=-0.1))
    with pytest.raises(TrainConfigError, match="preset='gpt-huge'.*gpt-nano"):
        train(tiny(data_dir, tmp_path / "r", max_iters=5, preset="gpt-huge"))
    with pytest.raises(TrainConfigError, match="no budget"):
        train(tiny(data_dir, tmp_path / "r"))
    with pytest.raises(OptimConfigError, match="unknown optimizer 'lion'"):
        make_optimizer(torch.nn.Linear(2, 2), "lion", 1e-3)
    with pytest.raises(ValueError, match="no training state|not found|holds no"):
        train(tiny(data_dir, tmp_path / "never-ran", max_iters=5, resume=True))
    assert not (tmp_path / "r").exists()  # bad settings are caught before anything is written


def test_train_command_runs(data_dir, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                data_dir,
                str(tmp_path / "run"),
                "--n-layer",
                "1",
                "--n-head",
                "2",
                "--n-embd",
                "16",
                "--block-size",
                "8",
                "--max-iters",
                "4",
                "--eval-interval",
                "2",
                "--eval-iters",
                "1",
                "--no-bias",
                "--no-progress",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["iters"] == 4
    model, _ = load_model(tmp_path / "run")
    assert model.config.bias is False and model.config.n_embd == 16


def test_a_minutes_only_budget_decays_the_cosine_over_the_time():
    from lmforge.train.optim import Schedule

    s = Schedule("cosine", lr=1e-3, warmup_iters=10, decay_iters=0, min_lr=1e-4)
    assert s.lr_at(5, 0.01) == pytest.approx(6e-4)  # warmup still counts iterations
    assert s.lr_at(10_000, 0.0) == pytest.approx(1e-3)  # no time spent: the peak, however many iterations ran
    assert s.lr_at(20, 0.5) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert s.lr_at(20, 1.3) == pytest.approx(1e-4)


def test_a_run_with_only_minutes_ends_its_cosine_when_the_time_ends(data_dir, tmp_path):
    cfg = tiny(
        data_dir,
        tmp_path / "run",
        max_iters=None,
        epochs=None,
        max_minutes=0.05,
        warmup_iters=0,
        lr=1e-2,
        min_lr=1e-3,
        log_interval=1,
        eval_interval=10**6,
    )
    summary = train(cfg)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert summary["stop_reason"] == "minutes" and len(lrs) > 3
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 9e-3 and lrs[-1] < 2e-3


def test_a_timed_run_evaluates_its_final_model(data_dir, tmp_path):
    # the time runs out between evaluations: the last steps (the annealed end of the cosine) are still evaluated,
    # and best/ holds them when they are the best, not the model of the last periodic evaluation
    cfg = tiny(
        data_dir,
        tmp_path / "run",
        max_iters=None,
        epochs=None,
        max_minutes=0.05,
        warmup_iters=0,
        log_interval=10,
        eval_interval=25,
    )
    summary = train(cfg)
    evals = [
        r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r
    ]
    assert summary["stop_reason"] == "minutes"
    assert evals[-1]["iter"] == summary["iters"] and summary["last_val_loss"] == evals[-1]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
    best_iter = min(evals, key=lambda r: r["val_loss"])["iter"]
    assert load_train_state(tmp_path / "run" / "best")["iter"] == best_iter
    assert load_train_state(tmp_path / "run" / "last")["iter"] == summary["iters"]


# ---------------------------------------------------------------------------------------------- never losing work


def test_an_earlier_run_is_kept_unless_resumed_or_overwritten(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--block-size",
        "8",
        "--eval-interval",
        "5",
        "--eval-iters",
        "1",
        "--no-progress",
        "--log-interval",
        "1",
    ]
    assert main(["train", data_dir, str(run), *flags, "--max-iters", "10"]) == 0
    before = {name: (run / name).read_bytes() for name in ("metrics.jsonl", "last/model.safetensors")}
    assert main(["train", data_dir, str(run), *flags, "--max-iters", "3"]) == 1
    err = capsys.readouterr().err
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err
    assert {name: (run / name).read_bytes() for name in before} == before  # nothing was touched
    (run / "notes.txt").write_text("mine")
    assert main(["train", data_dir, str(run), *flags, "--max-iters", "3", "--overwrite"]) == 0
    assert max(losses(run)) == 3 and load_train_state(run / "last")["iter"] == 3  # a new run, from scratch
    assert (run / "notes.txt").read_text() == "mine"  # only the run's own files were replaced
    with pytest.raises(TrainConfigError, match="overwrite and resume contradict"):
        train(TrainConfig(data=data_dir, out=str(run), max_iters=5, resume=True, overwrite=True))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_last_at_the_current_step_and_the_printed_command_resumes_it_exactly(data_dir, tmp_path, signum):
    run = tmp_path / "run"
    settings = dict(schedule="constant", eval_interval=10**6, log_interval=3, max_iters=10**5)
    flags = [
        f"--{k.replace('_', '-')}={v}"
        for k, v in {**tiny(data_dir, run).__dict__, **settings}.items()
        if k not in ("data", "out") and v is not None and not isinstance(v, bool)
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "train", data_dir, str(run), *flags, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or len((run / "metrics.jsonl").read_text().splitlines()) < 5:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.02)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, err
    stopped = json.loads(out.strip().splitlines()[-1])
    at = load_train_state(run / "last")["iter"]
    assert stopped["stop_reason"] == "interrupted" and stopped["iters"] == at >= 15  # the step it stopped at
    assert err.strip().splitlines()[-1].split() == ["lmforge", "train", "--config", str(run / "train.yaml"), "--resume"]
    command = err.strip().splitlines()[-1].split()[1:]
    subprocess.run(
        [sys.executable, "-m", "lmforge", *command, "--max-iters", str(at + 10)], check=True, capture_output=True
    )
    reference = train(tiny(data_dir, tmp_path / "reference", **{**settings, "max_iters": at + 10}))
    a, b = losses(tmp_path / "reference"), losses(run)
    assert sorted(a) == sorted(b) and max(a) == at + 10  # the lines logged across the stop come back whole
    for it in a:
        assert b[it] == pytest.approx(a[it], abs=1e-6), it
    assert load_train_state(run / "best")["best_val_loss"] == pytest.approx(reference["best_val_loss"], abs=1e-6)


def test_a_run_clears_what_killed_checkpoint_writes_left_and_nothing_a_live_process_writes(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny(data_dir, run, max_iters=10, eval_interval=5))
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    stale = [run / f".last.tmp-{dead}-a1b2c3d4", run / f".best.old-{dead}", run / ".last.k2j4h5g6"]
    alive = [run / f".last.tmp-{os.getpid()}-e5f6g7h8", run / ".best.zzzzzzzz"]  # a live writer; a recent legacy one
    for folder in stale + alive:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half")
    os.utime(run / ".last.k2j4h5g6", (time.time() - 7200,) * 2)  # a legacy name is stale after an hour
    train(tiny(data_dir, run, max_iters=15, eval_interval=5, resume=True))
    assert [f.name for f in stale if f.exists()] == []
    assert all(f.exists() for f in alive)
    assert load_train_state(run / "last")["iter"] == 15


def test_impossible_settings_are_refused_by_flag_before_anything_is_allocated(data_dir, tmp_path, capsys):
    from lmforge.train.config import device_memory, step_memory_lower_bound

    run = str(tmp_path / "run")
    common = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--max-iters", "2", "--no-progress"]
    assert main(["train", data_dir, run, *common, "--block-size", "100000"]) == 1
    assert "--block-size=100000 needs windows of 100001 tokens" in capsys.readouterr().err
    model = build_model_config(tiny(data_dir, run), json.loads(open(f"{data_dir}/meta.json").read())["vocab_size"])
    one, two = (step_memory_lower_bound(model, tiny(data_dir, run, batch_size=b), 16) for b in (1, 2))
    batch = 2 * device_memory(torch.device("cpu")) // (two - one)  # twice the machine's memory, at the least
    # in a process that may not reserve more than 8 GiB: were the check gone, it would fail there, not swap here
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, "
            "(8 << 30, 8 << 30)); from lmforge.cli import main; sys.exit(main(sys.argv[1:]))",
            "train",
            data_dir,
            run,
            *common,
            "--block-size",
            "16",
            "--batch-size",
            str(batch),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1 and f"--batch-size={batch} with block_size=16 needs at least" in proc.stderr
    assert not (tmp_path / "run").exists()
    train(tiny(data_dir, run, max_iters=2))  # context 16: a resumed run cannot train on longer windows
    with pytest.raises(TrainConfigError, match=r"block_size=32 is longer than the context .* \(16 positions\)"):
        train(tiny(data_dir, run, max_iters=4, block_size=32, resume=True))


def test_tensorboard_logger_writes_every_metric_and_forgets_what_a_resume_redoes(data_dir, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    settings = dict(max_iters=12, eval_interval=6, log_interval=3, logger="tensorboard", lr_decay_iters=12)
    checkpoints = []
    train(
        tiny(data_dir, run, **settings),
        on_eval=lambda it, val: checkpoints.append(shutil.copytree(run / "last", tmp_path / f"last{it}")),
    )
    shutil.rmtree(run / "last")
    shutil.copytree(checkpoints[0], run / "last")  # as if killed after iteration 6's checkpoint: 7..12 are redone
    train(tiny(data_dir, run, **settings, resume=True))
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    for key in ("loss", "lr", "val_loss", "val_ppl", "tokens_per_s"):
        logged = [(r["iter"], r[key]) for r in records if key in r]
        scalars = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in scalars] == [s for s, _ in logged], key  # once each: the first 7..12 purged
        assert [v for _, v in scalars] == pytest.approx([v for _, v in logged], rel=1e-6), key
    assert [s for s, _ in logged] == [6, 12] or key != "val_loss"
