"""The training loop: a prepared data folder in, a run folder out. nanoGPT's train.py, made a library function,
in the steps its reader knows:

    get_batch       batches()        endless (x, y) micro-batches: random windows, or sequential streams
    estimate_loss   estimate_loss()  the validation loss, on the same batches every time
    get_lr          Schedule.lr_at() (lmforge.train.optim) warmup, then cosine / constant / plateau
    one step        train_step()     grad_accum micro-batches, clip, optimizer step
    the loop        Trainer.run()    lmforge.train.loop's skeleton: budget, evaluation + checkpoints, early stop

The run folder:

    RUN/train.yaml        every setting of the run (TrainConfig): `lmforge train --config RUN/train.yaml` reruns it
    RUN/metrics.jsonl     one JSON line per logged iteration (iter, loss, lr, tokens_per_s) and per evaluation
    RUN/loss.png          the loss curves (RUN/tensorboard/ too with --logger tensorboard)
    RUN/best/             the model with the lowest validation loss so far (a model folder)
    RUN/last/             the latest model + train_state.pt (optimizer, schedule, RNG states, counters): what
                          `resume` continues from, so that a resumed run's losses equal an uninterrupted one's

Batches come in two modes: `random` windows each iteration (nanoGPT), or `sequential` (PyTorch's
word_language_model: the split cut into batch_size streams walked in consecutive windows, an epoch = one pass).
The budget is iterations, epochs or wall-clock minutes, whichever ends first; early stopping ends a run whose
validation loss has not improved for `patience` evaluations. A stop request (Ctrl-C or SIGTERM under `lmforge
train`) ends the run after its current step with last/ saved there.

Launched by torchrun, the same function trains on every process (lmforge.train.distributed: DDP or FSDP, each
rank its own rows of the global batch, rank 0 writing the files); `batch_size` is then per process, and a run on
N processes equals a single-process run with N times the batch_size. `device` and `dtype` choose the hardware
and mixed precision (bfloat16 or float16 autocast; float16 with a gradient scaler).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.checkpoint import CONFIG_FILE, load_model, load_train_state
from lmforge.config import ModelConfig
from lmforge.data import load_meta, load_split, random_batch, sequential_batches
from lmforge.model import Transformer
from lmforge.settings import write_config
from lmforge.train import distributed
from lmforge.train.config import (
    RUN_CONFIG_FILE,
    RUN_OUTPUTS,
    TrainConfig,
    TrainConfigError,  # noqa: F401
    build_model_config,
    check_fits,
    iters_per_epoch,
)
from lmforge.train.distributed import Dist
from lmforge.train.loop import Loop, budget_steps, claim_run_folder, prepare_run_folder, stop_on_signals
from lmforge.train.metrics import MetricsLog, plot_losses  # noqa: F401  (re-exported)
from lmforge.train.optim import Schedule, make_optimizer, set_lr

ALONE = Dist()  # a single process (not under torchrun)
CPU = torch.device("cpu")

# ---------------------------------------------------------------------------------------------- the steps


def batches(train: np.ndarray, cfg: TrainConfig, T: int, generator: torch.Generator, skip: int, env: Dist):
    """get_batch: endless (x, y) micro-batches of shape (B, T); sequential mode skips the first `skip` (a resumed
    run). Under torchrun each is this rank's rows of the global batch of B * world rows."""
    if cfg.batch_mode == "random":
        while True:
            if env.world == 1:
                yield random_batch(train, cfg.batch_size, T, generator)
            else:
                yield distributed.random_batch_shard(train, cfg.batch_size, T, generator, env)
    if env.world > 1:
        train = distributed.stream_shard(train, cfg.batch_size, env)
    epochs = itertools.chain.from_iterable(sequential_batches(train, cfg.batch_size, T) for _ in itertools.count())
    yield from itertools.islice(epochs, skip, None)


@torch.no_grad()
def estimate_loss(model: Transformer, val: np.ndarray, cfg: TrainConfig, T: int, autocast, env: Dist = ALONE) -> float:
    """Mean validation loss (no dropout, no label smoothing) over the batches `cfg.eval_mode` names.

    Under torchrun each rank scores its rows of every global batch (eval batch size * world rows) and the sums
    are all-reduced, so every rank gets the value a single process with the global batch size computes."""
    rows = cfg.eval_batch_size or cfg.batch_size
    B = rows * env.world
    if cfg.eval_mode == "random":  # nanoGPT's estimate_loss, on the same batches every time
        gen = torch.Generator().manual_seed(cfg.eval_seed)
        windows = (random_batch(val, B, T, gen) + (None,) for _ in range(cfg.eval_iters))
    elif cfg.eval_mode == "streams":  # the example's evaluate(): batchify(val, 10), consecutive bptt windows
        windows = ((x, y, None) for x, y in sequential_batches(val, B, T))
    else:
        from lmforge.data import eval_windows

        windows = eval_windows(val, T, batch_size=B)
    was_training = model.training
    model.eval()
    acc = torch.float32 if env.device.type == "mps" else torch.float64  # MPS has no float64
    total, count = torch.zeros((), dtype=acc, device=env.device), 0
    for x, y, mask in windows:
        x, y, mask = distributed.shard_rows(x, y, mask, rows, env)
        x, y = x.to(env.device), y.to(env.device)
        with autocast:
            logits = model(x)
        ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        if mask is not None:
            ce, n = ce * mask.flatten().to(env.device), int(mask.sum())
        else:
            n = ce.numel()
        total += ce.sum().to(acc)
        count += n
    model.train(was_training)
    if env.world > 1:
        sums = distributed.all_reduce(torch.stack([total, torch.tensor(count, dtype=acc, device=env.device)]), env)
        total, count = sums[0], int(sums[1])
    return float(total) / max(count, 1)


def train_step(
    model, wrapped, stream, optimizer, params: list, cfg: TrainConfig, autocast, scaler, env: Dist
) -> torch.Tensor:
    """One optimizer step: grad_accum micro-batches (gradients all-reduced on the last), clip, step. Returns the
    mean training loss as a tensor (read back only at log time: no device sync every step)."""
    loss_sum = torch.zeros((), device=env.device)
    for micro in range(cfg.grad_accum):
        x, y = next(stream)
        x, y = x.to(env.device, non_blocking=True), y.to(env.device, non_blocking=True)
        sync = micro == cfg.grad_accum - 1
        with distributed.grad_sync(wrapped, sync) if env.world > 1 else contextlib.nullcontext():
            with autocast:
                logits = model(x)  # (B, T, vocab)
            loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), label_smoothing=cfg.label_smoothing)
            scaled = loss / cfg.grad_accum
            (scaler.scale(scaled) if scaler else scaled).backward()
        loss_sum += loss.detach()
    if scaler:
        scaler.unscale_(optimizer)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip, foreach=True)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / cfg.grad_accum


def rng_state(generator: torch.Generator, device: torch.device = CPU) -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "data": generator.get_state(),
    }
    if device.type == "cuda":  # dropout on the GPU draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device = CPU) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def load_data_tokenizer(data_dir: str):
    """The data folder's tokenizer, saved with every checkpoint; None if it has none (or cannot be read)."""
    try:
        from lmforge.tokenizer import load_tokenizer

        return load_tokenizer(data_dir)
    except (ImportError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- the run


class Trainer:
    """One run on the process group and device `env` describes: built fresh or from last/ by __init__, trained
    by `run`. Every rank holds one; rank 0 writes the files."""

    def __init__(self, cfg: TrainConfig, env: Dist, on_eval=None, stop: threading.Event | None = None):
        if cfg.fsdp and env.world == 1:
            raise TrainConfigError(
                "{param}=True shards the model across processes: launch with torchrun "
                "--nproc_per_node N (N > 1), or drop --fsdp",
                param="fsdp",
            )
        self.cfg, self.env, self.on_eval, self.run_dir = cfg, env, on_eval, Path(cfg.out)
        claim_run_folder(self.run_dir, RUN_OUTPUTS, resume=cfg.resume, overwrite=cfg.overwrite)
        self.meta = load_meta(cfg.data)
        self.train_data, self.val_data = load_split(cfg.data, "train"), load_split(cfg.data, "val")
        self.tokenizer = load_data_tokenizer(cfg.data)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        state = load_train_state(self.run_dir / "last") if cfg.resume else None
        self.model = self.build_model(state is not None)
        self.wrapped = distributed.wrap(self.model, env, cfg.fsdp)  # DDP / FSDP under torchrun, else the model
        if env.world > 1:
            torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ between ranks, as between rows
        self.per_epoch = iters_per_epoch(cfg, len(self.train_data), self.T, env.world)
        max_iters = budget_steps(cfg.max_iters, cfg.epochs, self.per_epoch)
        self.optimizer = make_optimizer(
            self.model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2), cfg.momentum
        )
        # get_lr; with only a wall-clock budget the cosine decays over the minutes, ending when the time does
        self.schedule = Schedule(
            cfg.schedule, cfg.lr, cfg.warmup_iters, cfg.lr_decay_iters or max_iters or 0, min(cfg.min_lr, cfg.lr)
        )
        self.decay_by_time = cfg.schedule == "cosine" and not cfg.lr_decay_iters
        self.pending: list[torch.Tensor] = []  # training losses since the last metrics line
        where = self.restore(state) if state is not None else {}
        agree = (lambda values: distributed.max_over_ranks(values, env)) if env.world > 1 else None
        self.loop = Loop(
            max_iters=max_iters,
            max_minutes=cfg.max_minutes,
            eval_interval=cfg.eval_interval or self.per_epoch,
            patience=cfg.patience,
            stop=stop,
            agree=agree,
            **where,
        )
        distributed.barrier(env)  # every rank has read last/ before rank 0 may overwrite it
        self.metrics = None
        if env.is_main:
            prepare_run_folder(self.run_dir, RUN_OUTPUTS, overwrite=cfg.overwrite)
            write_config(
                self.run_dir / RUN_CONFIG_FILE,
                cfg,
                exclude=("resume", "overwrite"),
                header=f"lmforge train: the settings of this run. `lmforge train --config "
                f"{self.run_dir / RUN_CONFIG_FILE}` runs them again; add --resume to continue it",
            )
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", keep_until=self.loop.start, logger=cfg.logger)
        self.step_model = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.eval_model = distributed.unwrap(self.wrapped)  # DDP's replica (no hooks); FSDP's sharded model itself
        amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
        self.autocast = torch.autocast(env.device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
        self.scaler = torch.amp.GradScaler(env.device.type) if cfg.dtype == "float16" else None
        self.stream = batches(
            self.train_data, cfg, self.T, self.data_gen, skip=self.loop.start * cfg.grad_accum, env=env
        )
        self.tokens_per_iter = cfg.batch_size * env.world * self.T * cfg.grad_accum
        self.params = list(self.model.parameters())

    def build_model(self, resume: bool) -> Transformer:
        """Seed everything, check that the run fits, then build the model (fresh, or last/'s weights)."""
        cfg, last = self.cfg, self.run_dir / "last"
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)
        self.data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: the same global batch
        config = (
            ModelConfig.from_file(last / CONFIG_FILE) if resume else build_model_config(cfg, self.meta["vocab_size"])
        )
        if self.meta["vocab_size"] > config.vocab_size:
            raise TrainConfigError(
                f"the data in {cfg.data} has {self.meta['vocab_size']} token ids but the model's "
                f"vocabulary is {config.vocab_size}",
                param="data",
            )
        self.T = cfg.block_size or config.block_size
        check_fits(
            cfg,
            config,
            self.T,
            {"train": len(self.train_data), "val": len(self.val_data)},
            self.env.device,
            resumed_from=str(last) if resume else None,
        )
        if not resume or (last / distributed.SHARDED_DIR).is_dir():  # sharded weights come with the optimizer state
            model = Transformer(config)
        else:
            model, _ = load_model(last, with_tokenizer=False)
        return model.train().to(self.env.device)

    def restore(self, state: dict) -> dict:
        """Optimizer, schedule and RNG states as last/ saved them; returns where the loop stood."""
        env = self.env
        try:
            distributed.restore_optimizer(self.run_dir / "last", self.wrapped, self.optimizer, state)
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
        self.schedule.load_state_dict(state["schedule"])
        per_rank = state.get("rng_per_rank")
        own = per_rank[env.rank] if per_rank and len(per_rank) == env.world else state["rng"]
        set_rng_state({**own, "data": state["rng"]["data"]}, self.data_gen, env.device)
        pending = state.get("pending_losses")
        if pending and len(pending) == env.world:
            self.pending = [torch.tensor(v, device=env.device) for v in pending[env.rank]]
        return {
            "start": state["iter"],
            "best": state["best_val_loss"],
            "bad_evals": state["bad_evals"],
            "elapsed_s": state["elapsed_s"],
        }

    def checkpoint(self, folder: str) -> None:
        """Save a resumable model folder RUN/`folder` at the current step. Every rank calls it; rank 0 writes."""
        env, loop = self.env, self.loop
        rng = rng_state(self.data_gen, env.device)
        state = {
            "iter": loop.it,
            "schedule": self.schedule.state_dict(),
            "rng": rng,
            "best_val_loss": loop.best,
            "bad_evals": loop.bad_evals,
            "elapsed_s": loop.elapsed(),
            "world_size": env.world,
            "train_config": dataclasses.asdict(self.cfg),
            "pending_losses": distributed.gather_objects([float(v) for v in self.pending], env),
        }
        if env.world > 1:
            state["rng_per_rank"] = distributed.gather_objects(rng, env)
        distributed.save_checkpoint(
            self.run_dir / folder,
            self.wrapped,
            self.optimizer,
            self.tokenizer,
            state,
            env,
            sharded=self.cfg.fsdp_checkpoint == "sharded",
        )

    def evaluate(self) -> float:
        """Validation loss at the current step: logged, checkpointed (best when it improves, and last), plotted."""
        loop, it = self.loop, self.loop.it
        val = estimate_loss(self.eval_model, self.val_data, self.cfg, self.T, self.autocast, self.env)
        record = {
            "iter": it,
            "val_loss": val,
            "val_ppl": math.exp(min(val, 50.0)),
            "elapsed_s": round(loop.elapsed(), 2),
        }
        if self.meta.get("tokenizer") == "char":
            record["val_bpc"] = val / math.log(2)
        if self.schedule.observe(val):
            record["lr_reduced_to"] = self.schedule.lr_at(it)
        if self.metrics is not None:
            self.metrics.write(record)
        if loop.observe(val):
            self.checkpoint("best")
        self.checkpoint("last")
        if self.metrics is not None:
            plot_losses(self.metrics, self.run_dir / "loss.png")
        if self.on_eval is not None:
            self.on_eval(it, val)
        return val

    def log(self, lr: float, seconds: float) -> float:
        """A metrics line: the mean training loss since the last one (over all ranks' rows); returns it."""
        loss = float(distributed.all_reduce(torch.stack(self.pending).mean(), self.env)) / self.env.world
        tokens_per_s = len(self.pending) * self.tokens_per_iter / max(seconds, 1e-9)
        if self.metrics is not None:
            self.metrics.write({"iter": self.loop.it, "loss": loss, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
        self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")
        self.pending = []
        return loss

    def run(self) -> dict:
        """Step until the budget ends (or early stopping, a stop request, divergence); evaluate and checkpoint on
        the way and at the end; return a summary."""
        from time import perf_counter

        from tqdm import tqdm

        cfg, loop = self.cfg, self.loop
        self.bar = tqdm(
            total=loop.max_iters,
            initial=loop.start,
            disable=not (cfg.progress and self.env.is_main),
            unit="it",
            dynamic_ncols=True,
        )
        train_time, last_val, t_log = 0.0, None, perf_counter()
        try:
            while loop.running():
                t_step = perf_counter()
                lr = self.schedule.lr_at(loop.it, loop.time_fraction() if self.decay_by_time else None)
                set_lr(self.optimizer, lr)
                self.pending.append(
                    train_step(
                        self.step_model,
                        self.wrapped,
                        self.stream,
                        self.optimizer,
                        self.params,
                        cfg,
                        self.autocast,
                        self.scaler,
                        self.env,
                    )
                )
                train_time += perf_counter() - t_step
                loop.step_done()
                self.bar.update(1)
                if loop.it % cfg.log_interval == 0 or loop.it == loop.max_iters:
                    if not math.isfinite(self.log(lr, perf_counter() - t_log)):
                        loop.end("diverged")
                    t_log = perf_counter()
                if loop.eval_due() and loop.stop_reason != "diverged":
                    last_val = self.evaluate()
                    t_log = perf_counter()  # evaluation time is not training time
            self.bar.close()
            if loop.final_eval_due():  # the budget ran out between evaluations: the annealed end is often the best
                last_val = self.evaluate()
            if loop.evaluated_at != loop.it or loop.it == loop.start:  # diverged, stopped, or no step: save where
                self.checkpoint("last")  # it ended
                if self.metrics is not None:
                    plot_losses(self.metrics, self.run_dir / "loss.png")
            if not math.isfinite(loop.best) and (self.env.world > 1 or not (self.run_dir / "best").exists()):
                self.checkpoint("best")  # a run that never evaluated: its final model is its best
            distributed.barrier(self.env)  # the files are complete when any rank returns
        finally:
            self.bar.close()
            if self.metrics is not None:
                self.metrics.close()
        return {
            "run_dir": str(self.run_dir),
            "iters": loop.it,
            "stop_reason": loop.stop_reason,
            "best_val_loss": loop.best,
            "last_val_loss": last_val,
            "train_tokens_per_s": (loop.it - loop.start) * self.tokens_per_iter / max(train_time, 1e-9),
            "wall_s": loop.elapsed() - loop.elapsed_before,
            "params": self.model.num_params(),
            "tokens_per_iter": self.tokens_per_iter,
            "iters_per_epoch": self.per_epoch,
            "world_size": self.env.world,
        }


def train(config: TrainConfig, on_eval=None, stop: threading.Event | None = None) -> dict:
    """Train a model as `config` says; return a summary (iterations, losses, speed, where things are).

    `on_eval(iteration, val_loss)`, when given, is called after each evaluation's checkpoints are written;
    an exception it raises (a pruned search trial, say) ends training there and propagates. `stop`, when set,
    ends the run after its current step, with last/ saved there (stop_reason "interrupted"). Under torchrun
    every process runs this (and calls on_eval with the same value); only rank 0 writes files.
    """
    config.check()
    env = distributed.setup(config.device)
    try:
        return Trainer(config, env, on_eval, stop).run()
    finally:
        distributed.teardown(env)


def resume_command(run: Path, world: int) -> str:
    """The command that continues an interrupted run (from its saved settings)."""
    launcher = f"torchrun --nproc_per_node {world} -m lmforge" if world > 1 else "lmforge"
    return f"{launcher} train --config {run / RUN_CONFIG_FILE} --resume"


def train_command(config: TrainConfig) -> int:
    """Train a language model on a prepared data folder, writing best/ and last/ checkpoints, metrics and a plot.

    A budget is needed: --max-iters, --epochs or --max-minutes. Ctrl-C (or SIGTERM) stops after the current step
    with last/ saved there, and prints the command that resumes the run.
    """
    with stop_on_signals("training") as stop:
        summary = train(config, stop=stop)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, one summary line, not one per process
    if main:
        print(json.dumps(summary))
    if summary["stop_reason"] == "interrupted":
        if main:
            print(
                f"interrupted at iteration {summary['iters']}: {Path(config.out) / 'last'} holds it. Resume with:\n"
                f"  {resume_command(Path(config.out), summary['world_size'])}",
                file=sys.stderr,
            )
        return 128 + (stop.signum or 2)
    return 0
