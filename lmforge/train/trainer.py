"""The training loop: a prepared data folder in, a run folder out. nanoGPT's train.py, made a library function.

    RUN/train_args.json   every setting of the run (TrainConfig)
    RUN/metrics.jsonl     one JSON line per logged iteration (iter, loss, lr, tokens_per_s) and per evaluation
    RUN/loss.png          the loss curves
    RUN/best/             the model with the lowest validation loss so far (a model folder)
    RUN/last/             the latest model + train_state.pt (optimizer, schedule, RNG states, counters): what
                          `resume` continues from, so that a resumed run's losses equal an uninterrupted one's

Batches come in two modes: `random` windows each iteration (nanoGPT), or `sequential` (PyTorch's
word_language_model: the split cut into batch_size streams walked in consecutive windows, an epoch = one pass).
The budget is iterations, epochs or wall-clock minutes, whichever ends first; early stopping ends a run whose
validation loss has not improved for `patience` evaluations.

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
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.checkpoint import CONFIG_FILE, load_model, load_train_state
from lmforge.config import PRESETS, ModelConfig
from lmforge.data import load_meta, load_split, random_batch, sequential_batches
from lmforge.fsutil import atomic_write_text
from lmforge.model import Transformer
from lmforge.train import distributed
from lmforge.train.distributed import Dist
from lmforge.train.optim import OPTIMIZERS, SCHEDULES, Schedule, make_optimizer, set_lr
from lmforge.errors import LmforgeError


class TrainConfigError(LmforgeError):
    """A training setting out of range; the message names it and what is allowed."""


@dataclass
class TrainConfig:
    """Every setting of a training run. Model sizes left None come from the preset."""

    data: str
    """A data folder made by `lmforge prepare` (meta.json, train.bin, val.bin, tokenizer)."""
    out: str
    """The run folder to write (best/, last/, metrics.jsonl, loss.png, train_args.json)."""
    preset: str = "gpt-nano"
    """Model preset (lmforge.config.PRESETS); the vocabulary size always comes from the data."""
    n_layer: int | None = None
    """Override the preset's number of layers."""
    n_head: int | None = None
    """Override the preset's number of attention heads."""
    n_embd: int | None = None
    """Override the preset's model width."""
    block_size: int | None = None
    """Context length trained on (the window length; the example's bptt). None: the preset's."""
    dropout: float | None = None
    """Override the preset's dropout."""
    bias: bool | None = None
    """Override whether linear layers and norms have biases (nanoGPT's default is bias=False)."""
    batch_size: int = 12
    """Sequences per micro-batch (sequential mode: the number of parallel streams); per process under torchrun."""
    batch_mode: str = "random"
    """random: random windows each iteration (nanoGPT); sequential: consecutive windows of B streams."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    optimizer: str = "adamw"
    """adamw or sgd."""
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: str = "cosine"
    """cosine (warmup + cosine decay to min_lr), constant (warmup + flat) or plateau (lr/4 when val stalls)."""
    warmup_iters: int = 100
    """Iterations of linear warmup."""
    lr_decay_iters: int | None = None
    """Iteration where cosine decay reaches min_lr. None: the iteration budget."""
    min_lr: float = 1e-4
    """The cosine schedule's floor."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay on >= 2-D non-embedding weights (SGD: L2 on all)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.99
    """AdamW beta2."""
    momentum: float = 0.0
    """SGD momentum (the example uses none)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing for the training loss (evaluation never smooths)."""
    dtype: str = "float32"
    """float32, or bfloat16 / float16 autocast for the model's matmuls (weights, optimizer and loss stay float32;
    float16 scales the loss with a GradScaler). Half precision pays on GPUs; on a CPU bfloat16 may, float16 rarely."""
    device: str = "cpu"
    """cpu, cuda, mps, or auto (this rank's CUDA GPU if there is one, else the CPU)."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state across processes (FSDP2) instead of
    replicating the model on each (DDP)."""
    fsdp_checkpoint: str = "consolidated"
    """With fsdp: consolidated (rank 0 gathers the weights: a normal model folder) or sharded (each rank writes
    its shard into sharded/ of the folder; `distributed.consolidate` makes a normal one later)."""
    compile: bool = False
    """torch.compile the model (compile time counts in the run's wall time)."""
    num_threads: int | None = None
    """torch.set_num_threads for the run. None: PyTorch's default."""
    seed: int = 1337
    """Seeds the model init, dropout and the batch sampler."""
    max_iters: int | None = None
    """Budget: optimizer steps. At least one of max_iters, epochs, max_minutes must be set."""
    epochs: float | None = None
    """Budget: passes over the training split (random mode: train tokens / tokens per iteration)."""
    max_minutes: float | None = None
    """Budget: wall-clock minutes of training (resumed runs count the time already spent)."""
    eval_interval: int = 250
    """Evaluate every this many iterations, and at the end. 0: at the end of each epoch."""
    eval_mode: str = "random"
    """random: eval_iters random val batches from a fixed seed (nanoGPT's estimate_loss); streams: the val split
    as eval_batch_size streams of non-overlapping windows (the example); full: every val token once."""
    eval_iters: int = 20
    """Batches per evaluation in random mode."""
    eval_batch_size: int | None = None
    """Batch size for evaluation. None: batch_size."""
    eval_seed: int = 1234
    """Seed of the random evaluation batches: the same batches at every evaluation and in every run."""
    patience: int | None = None
    """Stop after this many evaluations in a row without a new best validation loss. None: never."""
    log_interval: int = 10
    """Write a metrics line (and read the loss back from the tensors) every this many iterations."""
    progress: bool = True
    """Show a tqdm progress bar."""
    resume: bool = False
    """Continue the run in `out` from its last/ checkpoint."""

    def check(self) -> None:
        """Raise TrainConfigError naming the first setting out of range."""
        choices = {"preset": tuple(PRESETS), "batch_mode": ("random", "sequential"), "optimizer": OPTIMIZERS,
                   "schedule": SCHEDULES, "dtype": ("float32", "bfloat16", "float16"),
                   "eval_mode": ("random", "streams", "full"), "device": distributed.DEVICES,
                   "fsdp_checkpoint": ("consolidated", "sharded")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise TrainConfigError(f"{key}={getattr(self, key)!r} is not one of: {', '.join(allowed)}")
        positive = ("batch_size", "grad_accum", "lr", "log_interval", "n_layer", "n_head", "n_embd", "block_size",
                    "max_iters", "epochs", "max_minutes", "eval_batch_size", "patience")
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise TrainConfigError(f"{key}={value} must be > 0")
        non_negative = ("warmup_iters", "min_lr", "weight_decay", "momentum", "grad_clip", "eval_interval",
                        "eval_iters")
        for key in non_negative:
            if getattr(self, key) < 0:
                raise TrainConfigError(f"{key}={getattr(self, key)} must be >= 0")
        for key in ("dropout", "label_smoothing"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise TrainConfigError(f"{key}={value} must be in [0, 1)")
        if self.max_iters is None and self.epochs is None and self.max_minutes is None:
            raise TrainConfigError("no budget: set max_iters, epochs or max_minutes")
        if self.eval_mode == "random" and self.eval_iters < 1:
            raise TrainConfigError("eval_iters must be >= 1 with eval_mode='random'")


# ---------------------------------------------------------------------------------------------- pieces


def build_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    overrides = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
                 if getattr(cfg, k) is not None}
    return ModelConfig.from_name(cfg.preset, vocab_size=vocab_size, **overrides)


def iters_per_epoch(cfg: TrainConfig, n_train: int, T: int, world: int = 1) -> int:
    """Optimizer steps in one pass over the training split (`world` processes each taking batch_size rows)."""
    B = cfg.batch_size * world
    if cfg.batch_mode == "sequential":
        windows = math.ceil((n_train // B - 1) / T)
    else:
        windows = n_train // (B * T)
    return max(1, windows // cfg.grad_accum)


def batches(train: np.ndarray, cfg: TrainConfig, T: int, generator: torch.Generator, skip: int, env: Dist):
    """Endless (x, y) micro-batches of shape (B, T); sequential mode skips the first `skip` (a resumed run).
    Under torchrun each is this rank's rows of the global batch of B * world rows."""
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
def estimate_loss(model: Transformer, val: np.ndarray, cfg: TrainConfig, T: int, autocast,
                  env: Dist = Dist()) -> float:
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


def rng_state(generator: torch.Generator, device: torch.device = torch.device("cpu")) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
             "data": generator.get_state()}
    if device.type == "cuda":  # dropout on the GPU draws from the device's generator
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, generator: torch.Generator, device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["data"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed as written. A resumed run first drops the lines logged
    after its checkpoint (iter > keep_until), so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, keep_until: int):
        self.path = path
        kept = [line for line in self.records() if line["iter"] <= keep_until] if keep_until else []
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def plot_losses(log: MetricsLog, png: Path) -> None:
    """Training and validation loss against iteration, written atomically (matplotlib's Agg backend, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lmforge.fsutil import atomic_path

    records = log.records()
    train_pts = [(r["iter"], r["loss"]) for r in records if "loss" in r]
    val_pts = [(r["iter"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for pts, label, style in ((train_pts, "train", "-"), (val_pts, "validation", "o-")):
        if pts:
            ax.plot(*zip(*pts), style, label=label, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def load_data_tokenizer(data_dir: str):
    """The data folder's tokenizer, saved with every checkpoint; None if it has none (or cannot be read)."""
    try:
        from lmforge.tokenizer import load_tokenizer

        return load_tokenizer(data_dir)
    except (ImportError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------- the loop


def train(config: TrainConfig, on_eval=None) -> dict:
    """Train a model as `config` says; return a summary (iterations, losses, speed, where things are).

    `on_eval(iteration, val_loss)`, when given, is called after each evaluation's checkpoints are written;
    an exception it raises (a pruned search trial, say) ends training there and propagates. Under torchrun
    every process runs this (and calls on_eval with the same value); only rank 0 writes files.
    """
    cfg = config
    cfg.check()
    env = distributed.setup(cfg.device)
    try:
        return run_training(cfg, env, on_eval)
    finally:
        distributed.teardown(env)


def run_training(cfg: TrainConfig, env: Dist, on_eval=None) -> dict:
    """The loop of `train`, on the process group and device `env` describes."""
    device, main = env.device, env.is_main
    if cfg.fsdp and env.world == 1:
        raise TrainConfigError("fsdp=True shards the model across processes: launch with torchrun "
                               "--nproc_per_node N (N > 1), or drop --fsdp")
    run = Path(cfg.out)
    meta = load_meta(cfg.data)
    train_data, val_data = load_split(cfg.data, "train"), load_split(cfg.data, "val")
    tokenizer = load_data_tokenizer(cfg.data)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)

    # ---- model, optimizer, schedule: fresh, or as the last checkpoint left them
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    random.seed(cfg.seed)
    data_gen = torch.Generator().manual_seed(cfg.seed)  # the same on every rank: they draw the same global batch
    state = None
    if cfg.resume:
        state = load_train_state(run / "last")
        if (run / "last" / distributed.SHARDED_DIR).is_dir():  # weights come with the optimizer state below
            model = Transformer(ModelConfig.from_file(run / "last" / CONFIG_FILE))
        else:
            model, _ = load_model(run / "last", with_tokenizer=False)
    else:
        model = Transformer(build_model_config(cfg, meta["vocab_size"]))
    if meta["vocab_size"] > model.config.vocab_size:
        raise TrainConfigError(f"the data in {cfg.data} has {meta['vocab_size']} token ids but the model's "
                               f"vocabulary is {model.config.vocab_size}")
    model.train().to(device)
    wrapped = distributed.wrap(model, env, cfg.fsdp)  # DDP / FSDP under torchrun, else the model itself
    if env.world > 1:
        torch.manual_seed(cfg.seed + env.rank)  # dropout masks differ between ranks, as between rows
    T = cfg.block_size or model.config.block_size
    per_epoch = iters_per_epoch(cfg, len(train_data), T, env.world)
    budgets = [b for b in (cfg.max_iters, cfg.epochs and math.ceil(cfg.epochs * per_epoch)) if b]
    max_iters = min(budgets) if budgets else None
    eval_interval = cfg.eval_interval or per_epoch
    optimizer = make_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                               cfg.momentum)
    schedule = Schedule(cfg.schedule, cfg.lr, cfg.warmup_iters, cfg.lr_decay_iters or max_iters or 0,
                        min(cfg.min_lr, cfg.lr))
    # Only a wall-clock budget: the cosine decays over the minutes, so it ends when the time does, at any speed.
    decay_by_time = cfg.schedule == "cosine" and not cfg.lr_decay_iters and max_iters is None
    start, best_val, bad_evals, elapsed_before = 0, math.inf, 0, 0.0
    if state is not None:
        try:
            distributed.restore_optimizer(run / "last", wrapped, optimizer, state)
        except ValueError as e:
            raise TrainConfigError(str(e)) from None
        schedule.load_state_dict(state["schedule"])
        per_rank = state.get("rng_per_rank")
        own = per_rank[env.rank] if per_rank and len(per_rank) == env.world else state["rng"]
        set_rng_state({**own, "data": state["rng"]["data"]}, data_gen, device)
        start, best_val, bad_evals = state["iter"], state["best_val_loss"], state["bad_evals"]
        elapsed_before = state["elapsed_s"]
    distributed.barrier(env)  # every rank has read last/ before rank 0 may overwrite it
    metrics = None
    if main:
        atomic_write_text(run / "train_args.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        metrics = MetricsLog(run / "metrics.jsonl", keep_until=start)

    step_model = torch.compile(wrapped) if cfg.compile else wrapped
    eval_model = distributed.unwrap(wrapped)  # DDP's replica (no hooks); FSDP's sharded model itself
    amp = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    autocast = torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)
    scaler = torch.amp.GradScaler(device.type) if cfg.dtype == "float16" else None
    stream = batches(train_data, cfg, T, data_gen, skip=start * cfg.grad_accum, env=env)
    tokens_per_iter = cfg.batch_size * env.world * T * cfg.grad_accum
    params = list(model.parameters())

    def checkpoint(folder: str, it: int) -> None:  # every rank calls it; rank 0 writes
        rng = rng_state(data_gen, device)
        train_state = {"iter": it, "schedule": schedule.state_dict(), "rng": rng, "best_val_loss": best_val,
                       "bad_evals": bad_evals, "elapsed_s": elapsed_before + time.perf_counter() - t_start,
                       "train_config": dataclasses.asdict(cfg), "world_size": env.world}
        if env.world > 1:
            train_state["rng_per_rank"] = distributed.gather_objects(rng, env)
        distributed.save_checkpoint(run / folder, wrapped, optimizer, tokenizer, train_state, env,
                                    sharded=cfg.fsdp_checkpoint == "sharded")

    evaluated_at = start

    def evaluate(it: int) -> float:
        """Validation loss at step `it`: logged, checkpointed (best when it improves, and last), plotted."""
        nonlocal best_val, bad_evals
        val = estimate_loss(eval_model, val_data, cfg, T, autocast, env)
        record = {"iter": it, "val_loss": val, "val_ppl": math.exp(min(val, 50.0)),
                  "elapsed_s": round(elapsed_before + time.perf_counter() - t_start, 2)}
        if meta.get("tokenizer") == "char":
            record["val_bpc"] = val / math.log(2)
        if schedule.observe(val):
            record["lr_reduced_to"] = schedule.lr_at(it)
        if main:
            metrics.write(record)
        improved = val < best_val
        best_val, bad_evals = min(best_val, val), 0 if improved else bad_evals + 1
        if improved:
            checkpoint("best", it)
        checkpoint("last", it)
        if main:
            plot_losses(metrics, run / "loss.png")
        if on_eval is not None:
            on_eval(it, val)
        return val

    from tqdm import tqdm

    bar = tqdm(total=max_iters, initial=start, disable=not (cfg.progress and main), unit="it", dynamic_ncols=True)
    t_start = time.perf_counter()
    train_time, pending, stop_reason, it = 0.0, [], "budget", start
    last_val = None
    t_log = time.perf_counter()
    while max_iters is None or it < max_iters:
        elapsed = elapsed_before + time.perf_counter() - t_start
        if cfg.max_minutes is not None:
            elapsed = distributed.max_over_ranks(elapsed, env)
            if elapsed >= 60 * cfg.max_minutes:
                stop_reason = "minutes"
                break
        # ---- one optimizer step: grad_accum micro-batches (gradients all-reduced on the last), clip, step
        t_step = time.perf_counter()
        lr = schedule.lr_at(it, elapsed / (60 * cfg.max_minutes) if decay_by_time else None)
        set_lr(optimizer, lr)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            sync = micro == cfg.grad_accum - 1
            with distributed.grad_sync(wrapped, sync) if env.world > 1 else contextlib.nullcontext():
                with autocast:
                    logits = step_model(x)  # (B, T, vocab)
                loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(),
                                       label_smoothing=cfg.label_smoothing)
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
        pending.append(loss_sum / cfg.grad_accum)  # read back only at log time: no sync every step
        train_time += time.perf_counter() - t_step
        it += 1
        bar.update(1)

        # ---- log: the mean training loss since the last line (over all ranks' rows)
        if it % cfg.log_interval == 0 or it == max_iters:
            mean_loss = distributed.all_reduce(torch.stack(pending).mean(), env)
            loss_value = float(mean_loss) / env.world
            now = time.perf_counter()
            tokens_per_s = len(pending) * tokens_per_iter / max(now - t_log, 1e-9)
            if main:
                metrics.write({"iter": it, "loss": loss_value, "lr": lr, "tokens_per_s": round(tokens_per_s, 1)})
            bar.set_postfix(loss=f"{loss_value:.4f}", tok_s=f"{tokens_per_s:,.0f}")
            pending, t_log = [], now
            if not math.isfinite(loss_value):
                stop_reason = "diverged"
                break

        # ---- evaluate, keep the best, maybe stop
        if it % eval_interval == 0:
            last_val, evaluated_at = evaluate(it), it
            t_log = time.perf_counter()  # evaluation time is not training time
            if cfg.patience is not None and bad_evals >= cfg.patience:
                stop_reason = "early_stop"
                break
    bar.close()
    if evaluated_at != it and stop_reason != "diverged":
        # "and at the end": the budget (steps, epochs or minutes) ran out between evaluations; the end of a run,
        # its schedule annealed, is often its best model
        last_val, evaluated_at = evaluate(it), it
    if evaluated_at != it or it == start:  # diverged, or no step taken: last/ and the plot show where it ended
        checkpoint("last", it)
        if main:
            plot_losses(metrics, run / "loss.png")
    if not math.isfinite(best_val) and (env.world > 1 or not (run / "best").exists()):
        checkpoint("best", it)  # a run that never evaluated: its final model is its best
    distributed.barrier(env)  # the files are complete when any rank returns
    wall = time.perf_counter() - t_start
    trained = it - start
    return {"run_dir": str(run), "iters": it, "stop_reason": stop_reason, "best_val_loss": best_val,
            "last_val_loss": last_val, "train_tokens_per_s": trained * tokens_per_iter / max(train_time, 1e-9),
            "wall_s": wall, "params": model.num_params(), "tokens_per_iter": tokens_per_iter,
            "iters_per_epoch": per_epoch, "world_size": env.world}


def train_command(data: str, out: str, preset: str = "gpt-nano", n_layer: int | None = None,
                  n_head: int | None = None, n_embd: int | None = None, block_size: int | None = None,
                  dropout: float | None = None, no_bias: bool = False, batch_size: int = 12,
                  batch_mode: str = "random", grad_accum: int = 1, optimizer: str = "adamw", lr: float = 1e-3,
                  schedule: str = "cosine", warmup_iters: int = 100, lr_decay_iters: int | None = None,
                  min_lr: float = 1e-4, weight_decay: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
                  momentum: float = 0.0, grad_clip: float = 1.0, label_smoothing: float = 0.0,
                  dtype: str = "float32", compile: bool = False, num_threads: int | None = None,
                  seed: int = 1337, max_iters: int | None = None, epochs: float | None = None,
                  max_minutes: float | None = None, eval_interval: int = 250, eval_mode: str = "random",
                  eval_iters: int = 20, eval_batch_size: int | None = None, eval_seed: int = 1234,
                  patience: int | None = None, log_interval: int = 10, progress: bool = True,
                  resume: bool = False, device: str = "cpu", fsdp: bool = False,
                  fsdp_checkpoint: str = "consolidated") -> int:
    """Train a language model on a prepared data folder, writing best/ and last/ checkpoints, metrics and a plot.

    Args:
        data: a data folder made by `lmforge prepare`.
        out: the run folder (best/, last/, metrics.jsonl, loss.png, train_args.json).
        preset: model preset; the vocabulary size comes from the data.
        n_layer: override the preset's layer count.
        n_head: override the preset's head count.
        n_embd: override the preset's width.
        block_size: context length trained on (the bptt length); default the preset's.
        dropout: override the preset's dropout.
        no_bias: drop the biases of linear layers and norms (nanoGPT's bias=False); default: the preset's.
        batch_size: sequences per micro-batch (sequential mode: parallel streams).
        batch_mode: random (random windows, nanoGPT) or sequential (consecutive windows of streams, by epoch).
        grad_accum: micro-batches per optimizer step.
        optimizer: adamw or sgd.
        lr: peak learning rate.
        schedule: cosine (warmup + cosine decay to min_lr), constant, or plateau (lr/4 when validation stalls).
        warmup_iters: linear warmup iterations.
        lr_decay_iters: iteration where cosine decay ends (default: the iteration budget).
        min_lr: the cosine schedule's floor.
        weight_decay: AdamW decoupled weight decay on non-embedding matrices (SGD: L2 on all).
        beta1: AdamW beta1.
        beta2: AdamW beta2.
        momentum: SGD momentum.
        grad_clip: clip the global gradient norm to this (0: off).
        label_smoothing: label smoothing of the training loss.
        dtype: float32, or bfloat16 / float16 autocast for the matmuls (float16 with a loss scaler; for GPUs).
        compile: torch.compile the model.
        num_threads: CPU threads for PyTorch.
        seed: random seed (init, dropout, batches).
        max_iters: budget in optimizer steps.
        epochs: budget in passes over the training split.
        max_minutes: budget in wall-clock minutes.
        eval_interval: evaluate every this many iterations (0: every epoch), and at the end.
        eval_mode: random (eval_iters fixed-seed random batches), streams (the example's), or full.
        eval_iters: batches per evaluation in random mode.
        eval_batch_size: evaluation batch size (default batch_size).
        eval_seed: seed of the random evaluation batches.
        patience: stop after this many evaluations without improvement.
        log_interval: iterations per metrics line.
        progress: show a progress bar.
        resume: continue the run in OUT from its last/ checkpoint.
        device: cpu, cuda, mps, or auto (the GPU if there is one). Under torchrun each process takes
            cuda:LOCAL_RANK.
        fsdp: under torchrun, shard the model across processes (FSDP) instead of replicating it (DDP).
        fsdp_checkpoint: with --fsdp: consolidated (a normal model folder) or sharded (each rank writes its part).
    """
    args = {k: v for k, v in locals().items() if k != "no_bias"}
    args["bias"] = False if no_bias else None
    summary = train(TrainConfig(**args))
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary line, not one per process
        print(json.dumps(summary))
    return 0
