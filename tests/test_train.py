"""The training loop on a tiny char corpus: it learns, resumes exactly, stops when told, and writes its run folder."""

import json
import math

import pytest
import torch

from lmforge.checkpoint import load_model, load_train_state
from lmforge.config import ModelConfig
from lmforge.model import Transformer
from lmforge.train.optim import OptimConfigError, Schedule, make_optimizer, param_groups
from lmforge.train.trainer import TrainConfig, TrainConfigError, train, train_command



def tiny(data_dir, out, **kw) -> TrainConfig:
    """A one-layer 32-wide model with context 16: a few ms per iteration."""
    settings = dict(data=data_dir, out=str(out), preset="gpt-nano", n_layer=1, n_head=2, n_embd=32, block_size=16,
                    batch_size=8, lr=3e-3, warmup_iters=5, min_lr=3e-4, eval_interval=20, eval_iters=2,
                    log_interval=1, progress=False, num_threads=1)
    settings.update(kw)
    return TrainConfig(**settings)


def losses(run) -> dict[int, float]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in lines if "loss" in r}


def test_loss_falls_and_run_folder_is_complete(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path / "run", max_iters=60))
    curve = losses(tmp_path / "run")
    assert sorted(curve) == list(range(1, 61))
    assert sum(list(curve.values())[-5:]) / 5 < sum(list(curve.values())[:5]) / 5 - 0.8
    assert summary["iters"] == 60 and summary["stop_reason"] == "budget"
    for name in ("metrics.jsonl", "loss.png", "train_args.json", "best/config.json", "last/model.safetensors"):
        assert (tmp_path / "run" / name).exists(), name
    assert (tmp_path / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, tok = load_model(tmp_path / "run" / "last")
    assert tok is not None and tok.decode(tok.encode("fox")) == "fox"
    state = load_train_state(tmp_path / "run" / "last")
    assert state["iter"] == 60 and set(state["rng"]) == {"torch", "numpy", "python", "data"}
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
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
    summary = train(tiny(data_dir, tmp_path / "run", max_iters=1000, lr=5.0, min_lr=0.0, warmup_iters=0,
                         grad_clip=0.0, eval_interval=5, patience=2, log_interval=5))
    assert summary["stop_reason"] in ("early_stop", "diverged")
    assert summary["iters"] < 1000


def test_minutes_budget_stops(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path / "run", max_minutes=0.02, schedule="constant", eval_interval=10_000, log_interval=50))
    assert summary["stop_reason"] == "minutes"
    assert 0 < summary["iters"] and summary["wall_s"] < 10


def test_epochs_budget_with_sequential_batches(data_dir, tmp_path):
    summary = train(tiny(data_dir, tmp_path / "run", batch_mode="sequential", epochs=2, eval_interval=0,
                         optimizer="sgd", lr=1.0, schedule="constant", warmup_iters=0))
    assert summary["iters"] == 2 * summary["iters_per_epoch"]
    evals = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if "val_loss" in l]
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
    train(tiny(data_dir, tmp_path / "run", optimizer="sgd", lr=20.0, schedule="plateau", warmup_iters=0,
               grad_clip=0.25, max_iters=40, eval_interval=2, weight_decay=0.0))
    records = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
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
    assert decayed == {n for n, p in model.named_parameters()
                       if p.dim() == 2 and not n.startswith(("tok_emb", "pos_emb"))}
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
    assert train_command(data_dir, str(tmp_path / "run"), n_layer=1, n_head=2, n_embd=16, block_size=8,
                         max_iters=4, eval_interval=2, eval_iters=1, no_bias=True, progress=False) == 0
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
    cfg = tiny(data_dir, tmp_path / "run", max_iters=None, epochs=None, max_minutes=0.05, warmup_iters=0,
               lr=1e-2, min_lr=1e-3, log_interval=1, eval_interval=10**6)
    summary = train(cfg)
    lrs = [r["lr"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) if "lr" in r]
    assert summary["stop_reason"] == "minutes" and len(lrs) > 3
    assert lrs == sorted(lrs, reverse=True) and lrs[0] > 9e-3 and lrs[-1] < 2e-3


def test_a_timed_run_evaluates_its_final_model(data_dir, tmp_path):
    # the time runs out between evaluations: the last steps (the annealed end of the cosine) are still evaluated,
    # and best/ holds them when they are the best, not the model of the last periodic evaluation
    cfg = tiny(data_dir, tmp_path / "run", max_iters=None, epochs=None, max_minutes=0.05, warmup_iters=0,
               log_interval=10, eval_interval=25)
    summary = train(cfg)
    evals = [r for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if "val_loss" in r]
    assert summary["stop_reason"] == "minutes"
    assert evals[-1]["iter"] == summary["iters"] and summary["last_val_loss"] == evals[-1]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in evals)
    best_iter = min(evals, key=lambda r: r["val_loss"])["iter"]
    assert load_train_state(tmp_path / "run" / "best")["iter"] == best_iter
    assert load_train_state(tmp_path / "run" / "last")["iter"] == summary["iters"]
