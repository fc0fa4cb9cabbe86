"""`lmforge train` under torchrun on 2 CPU processes (gloo): it equals a single process with the global batch,
it survives being killed and resumed, and FSDP's checkpoints (sharded and consolidated) load and resume."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from lmforge.checkpoint import load_model, load_train_state
from lmforge.data import load_split
from lmforge.serve.process import free_port
from lmforge.train.distributed import consolidate, pick_device
from lmforge.train.trainer import TrainConfig, TrainConfigError, estimate_loss, train

# a one-layer 32-wide model, context 16, dropout 0 (so runs can agree); batch_size is per process
SETTINGS = dict(
    n_layer=1,
    n_head=2,
    n_embd=32,
    block_size=16,
    dropout=0.0,
    lr=3e-3,
    warmup_iters=5,
    min_lr=3e-4,
    eval_interval=10,
    eval_iters=2,
    log_interval=1,
    grad_accum=2,
    progress=False,
)
ITERS = 60
slow = pytest.mark.slow  # the tests that start torchrun (2 worker processes) once or twice


def torchrun_args(data_dir, out, nproc=2, **settings) -> list[str]:
    """`python -m torch.distributed.run ... -m lmforge train DATA OUT --flags` for these settings."""
    flags = []
    for key, value in {**SETTINGS, **settings}.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            flags.append(flag)
        elif value is False:
            flags.append("--no-" + key.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "lmforge",
        "train",
        data_dir,
        str(out),
        *flags,
    ]


def torchrun(data_dir, out, **settings) -> None:
    proc = subprocess.run(
        torchrun_args(data_dir, out, **settings),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def val_losses(run) -> dict[int, float]:
    return {r["iter"]: r["val_loss"] for r in records(run) if "val_loss" in r}


def single(data_dir, out, **settings) -> dict:
    """The same run in this process, with the global batch (2 x the per-process batch_size)."""
    return train(TrainConfig(data=data_dir, out=str(out), num_threads=1, **{**SETTINGS, **settings}))


@pytest.fixture(scope="module")
def ddp_run(data_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(data_dir, run, batch_size=4, max_iters=ITERS)
    return run


@slow
def test_two_processes_equal_one_with_the_global_batch(data_dir, ddp_run, tmp_path):
    single(data_dir, tmp_path / "one", batch_size=8, max_iters=ITERS)
    two, one = val_losses(ddp_run), val_losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == list(range(10, ITERS + 1, 10))
    for it in one:
        assert two[it] == pytest.approx(one[it], rel=1e-5), it
    assert two[ITERS] < two[10] - 0.3  # it learned
    train_two = {r["iter"]: r["loss"] for r in records(ddp_run) if "loss" in r}  # the mean over both ranks' rows
    train_one = {r["iter"]: r["loss"] for r in records(tmp_path / "one") if "loss" in r}
    assert sorted(train_two) == list(range(1, ITERS + 1))  # written once (rank 0), not once per process
    for it in train_one:
        assert train_two[it] == pytest.approx(train_one[it], rel=1e-5), it
    state = load_train_state(ddp_run / "last")
    assert state["iter"] == ITERS and state["world_size"] == 2 and len(state["rng_per_rank"]) == 2
    model, tokenizer = load_model(ddp_run / "last")  # a normal model folder
    assert tokenizer is not None and not any(k.startswith("module.") for k in model.state_dict())
    assert not list(ddp_run.glob(".*"))  # no scratch files or folders left behind


@slow
def test_killed_run_resumes_to_the_uninterrupted_result(data_dir, ddp_run, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        torchrun_args(data_dir, run, batch_size=4, max_iters=ITERS),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 300
        while not (run / "last" / "train_state.pt").exists():  # the first checkpoint (iteration 10)
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended before a checkpoint"
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
        proc.wait()
    interrupted_at = load_train_state(run / "last")["iter"]
    assert 10 <= interrupted_at < ITERS

    torchrun(data_dir, run, batch_size=4, max_iters=ITERS, resume=True)
    # model, optimizer, schedule, data generator and RNG states all come back and gloo's two-rank sum is
    # deterministic, so the resumed run repeats the uninterrupted one's arithmetic exactly
    assert val_losses(run) == val_losses(ddp_run)
    iters = [r["iter"] for r in records(run) if "loss" in r]
    assert iters == list(range(1, ITERS + 1))  # lines logged after the checkpoint were dropped, then redone
    assert load_train_state(run / "last")["iter"] == ITERS


@slow
def test_fsdp_sharded_then_consolidated(data_dir, tmp_path):
    # sequential streams and full evaluation exercise the other shardings (streams, short last eval batch)
    common = dict(
        batch_size=4,
        batch_mode="sequential",
        eval_mode="full",
        eval_batch_size=3,
        n_layer=2,
        max_iters=20,
        lr_decay_iters=20,
    )
    run = tmp_path / "fsdp"
    torchrun(data_dir, run, fsdp=True, fsdp_checkpoint="sharded", **{**common, "max_iters": 10})
    assert (run / "last" / "sharded" / ".metadata").exists() and not (run / "last" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="sharded"):
        load_model(run / "last")  # not a normal model folder until consolidated
    at10 = consolidate(run / "last", tmp_path / "at10")
    torchrun(data_dir, run, fsdp=True, resume=True, **common)  # resume from shards, save consolidated

    one = single(data_dir, tmp_path / "one", **{**common, "batch_size": 8, "eval_batch_size": 6})
    fsdp, ref = val_losses(run), val_losses(tmp_path / "one")
    assert sorted(fsdp) == sorted(ref) == [10, 20]
    for it in ref:  # reduce-scatter sums in another order than one process's backward: close, not bitwise
        assert fsdp[it] == pytest.approx(ref[it], rel=1e-4), it

    cfg = TrainConfig(data=data_dir, out=str(tmp_path / "x"), eval_mode="full", eval_batch_size=6, max_iters=1)
    val = load_split(data_dir, "val")
    no_autocast = torch.autocast("cpu", enabled=False)
    for folder, it in ((at10, 10), (run / "last", 20)):
        model, _ = load_model(folder)  # lmforge's normal loader reads both
        assert estimate_loss(model, val, cfg, 16, no_autocast) == pytest.approx(fsdp[it], rel=1e-5), folder
    assert one["iters"] == 20


def test_float16_with_loss_scaling_tracks_float32(data_dir, tmp_path):
    # the GradScaler path (float16 autocast) runs on the CPU too; it must learn what float32 learns
    full = single(data_dir, tmp_path / "fp32", batch_size=8, max_iters=20, device="auto")
    half = single(data_dir, tmp_path / "fp16", batch_size=8, max_iters=20, dtype="float16")
    assert half["best_val_loss"] == pytest.approx(full["best_val_loss"], rel=0.02)
    assert half["best_val_loss"] < val_losses(tmp_path / "fp16")[10]


def test_device_and_fsdp_settings_are_checked(data_dir, tmp_path):
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(TrainConfigError, match="device='tpu' is not one of: auto, cpu, cuda, mps"):
        single(data_dir, tmp_path / "r", max_iters=2, device="tpu")
    with pytest.raises(TrainConfigError, match="fsdp=True .* torchrun"):
        single(data_dir, tmp_path / "r", max_iters=2, fsdp=True)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA GPU"):
            single(data_dir, tmp_path / "r", max_iters=2, device="cuda")
