"""TrainConfig: every setting of a training run, each written once (type, default, help), and the checks that
refuse a run which cannot work before anything is allocated or written.

`lmforge train` makes one flag per field (lmforge.cli), `--config FILE.yaml` reads the same fields from a file,
and every run keeps the settings it ran as RUN/train.yaml.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Literal

import torch

from lmforge.config import PRESETS, ModelConfig
from lmforge.errors import LmforgeError
from lmforge.settings import check_choices

RUN_OUTPUTS = ("best", "last", "metrics.jsonl", "loss.png", "train.yaml", "train_args.json", "tensorboard")
RUN_CONFIG_FILE = "train.yaml"  # the settings a run ran with (older runs: train_args.json, which --config reads too)


class TrainConfigError(LmforgeError):
    """A training setting out of range; the message names it and what is allowed."""


@dataclass
class TrainConfig:
    """Every setting of a training run. Model sizes left None come from the preset."""

    data: str
    """A data folder made by `lmforge prepare` (meta.json, train.bin, val.bin, tokenizer)."""
    out: str
    """The run folder to write (best/, last/, metrics.jsonl, loss.png, train.yaml)."""
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
    """Linear layers and norms have biases (--no-bias: nanoGPT's bias=False). Unset: the preset's."""
    batch_size: int = 12
    """Sequences per micro-batch (sequential mode: the number of parallel streams); per process under torchrun."""
    batch_mode: Literal["random", "sequential"] = "random"
    """random: random windows each iteration (nanoGPT); sequential: consecutive windows of B streams."""
    grad_accum: int = 1
    """Micro-batches whose gradients are summed before each optimizer step."""
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """adamw or sgd."""
    lr: float = 1e-3
    """Peak learning rate."""
    schedule: Literal["cosine", "constant", "plateau"] = "cosine"
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
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """float32, or bfloat16 / float16 autocast for the model's matmuls (weights, optimizer and loss stay float32;
    float16 scales the loss with a GradScaler). Half precision pays on GPUs; on a CPU bfloat16 may, float16 rarely."""
    device: Literal["auto", "cpu", "cuda", "mps"] = "cpu"
    """cpu, cuda, mps, or auto (this rank's CUDA GPU if there is one, else the CPU). Under torchrun each process
    takes cuda:LOCAL_RANK."""
    fsdp: bool = False
    """Under torchrun: shard parameters, gradients and optimizer state across processes (FSDP2) instead of
    replicating the model on each (DDP)."""
    fsdp_checkpoint: Literal["consolidated", "sharded"] = "consolidated"
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
    eval_mode: Literal["random", "streams", "full"] = "random"
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
    logger: Literal["tensorboard"] | None = None
    """Also log every metric to TensorBoard event files in RUN/tensorboard (needs the tensorboard package)."""
    progress: bool = True
    """Show a tqdm progress bar."""
    resume: bool = False
    """Continue the run in `out` from its last/ checkpoint."""
    overwrite: bool = False
    """Start over in an `out` that holds an earlier run, deleting its checkpoints and metrics."""

    def check(self) -> None:
        """Raise TrainConfigError naming the first setting out of range."""
        check_choices(self, TrainConfigError)
        if self.preset not in PRESETS:
            raise TrainConfigError(f"{{param}}={self.preset!r} is not one of: {', '.join(PRESETS)}", param="preset")
        positive = (
            "batch_size",
            "grad_accum",
            "lr",
            "log_interval",
            "n_layer",
            "n_head",
            "n_embd",
            "block_size",
            "max_iters",
            "epochs",
            "max_minutes",
            "eval_batch_size",
            "patience",
            "num_threads",
        )
        for key in positive:
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise TrainConfigError(f"{{param}}={value} must be > 0", param=key)
        non_negative = (
            "warmup_iters",
            "min_lr",
            "weight_decay",
            "momentum",
            "grad_clip",
            "eval_interval",
            "eval_iters",
        )
        for key in non_negative:
            if getattr(self, key) < 0:
                raise TrainConfigError(f"{{param}}={getattr(self, key)} must be >= 0", param=key)
        for key in ("dropout", "label_smoothing"):
            value = getattr(self, key)
            if value is not None and not 0 <= value < 1:
                raise TrainConfigError(f"{{param}}={value} must be in [0, 1)", param=key)
        if self.max_iters is None and self.epochs is None and self.max_minutes is None:
            raise TrainConfigError(
                "no budget: set max_iters, epochs or max_minutes (on the command line "
                "--max-iters, --epochs or --max-minutes)",
                param="max_iters",
            )
        if self.eval_mode == "random" and self.eval_iters < 1:
            raise TrainConfigError("{param} must be >= 1 with eval_mode='random'", param="eval_iters")
        if self.resume and self.overwrite:
            raise TrainConfigError(
                "{param} and resume contradict each other: keep the run or replace it", param="overwrite"
            )


def build_model_config(cfg: TrainConfig, vocab_size: int) -> ModelConfig:
    overrides = {
        k: getattr(cfg, k)
        for k in ("n_layer", "n_head", "n_embd", "block_size", "dropout", "bias")
        if getattr(cfg, k) is not None
    }
    return ModelConfig.from_name(cfg.preset, vocab_size=vocab_size, **overrides)


# ---------------------------------------------------------------------------------------------- can it run?


def step_memory_lower_bound(model_config: ModelConfig, cfg: TrainConfig, T: int) -> int:
    """Bytes one training step needs at the least: weights, gradients and optimizer state (float32), the
    activations the backward pass keeps (counted at 12 float32 values per token, layer and model dimension;
    PyTorch keeps 20-24 on a CPU with its flash attention, more without) and the float32 logits twice.
    A lower bound, so that refusing a run it puts above the machine's memory never refuses one that fits."""
    from lmforge.model import Transformer

    with torch.device("meta"):  # sizes only: nothing is allocated
        params = Transformer(model_config).num_params()
    state = {"adamw": 8, "sgd": 4 if cfg.momentum else 0}[cfg.optimizer]
    per_value = 4 if cfg.dtype == "float32" else 2
    tokens = cfg.batch_size * T
    activations = 12 * per_value * model_config.n_layer * tokens * model_config.n_embd
    return params * (8 + state) + activations + 2 * 4 * tokens * model_config.vocab_size


def device_memory(device: torch.device) -> int | None:
    """Total memory of the device a run trains on (a CPU: the machine's RAM); None where unknown."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    if device.type == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def check_fits(
    cfg: TrainConfig,
    model_config: ModelConfig,
    T: int,
    splits: dict[str, int],
    device: torch.device,
    resumed_from: str | None = None,
) -> None:
    """Refuse, before anything is allocated, a run that cannot work: windows longer than a split holds, or than
    the position table of the model resumed, or a step whose memory (at the least) is more than the device has."""
    if resumed_from is not None and T > model_config.block_size:
        raise TrainConfigError(
            f"{{param}}={T} is longer than the context of the model in {resumed_from} "
            f"({model_config.block_size} positions); use {model_config.block_size} or less",
            param="block_size",
        )
    needed = {"train": T + 1, **({"val": T + 1} if cfg.eval_mode == "random" else {})}
    for split, n in needed.items():
        if splits[split] < n:
            raise TrainConfigError(
                f"{{param}}={T} needs windows of {n} tokens, but the {split} split of {cfg.data} "
                f"holds {splits[split]}: lower it, or prepare more data",
                param="block_size",
            )
    have = device_memory(device)
    need = step_memory_lower_bound(model_config, cfg, T)
    if have is not None and need > have:
        longer = cfg.block_size is not None and cfg.block_size > ModelConfig.from_name(cfg.preset).block_size
        param, other = (
            ("block_size", f"batch_size={cfg.batch_size}") if longer else ("batch_size", f"block_size={T}")
        )  # the flag named: a context longer than the preset's, else the batch
        raise TrainConfigError(
            f"{{param}}={getattr(cfg, param)} with {other} needs at least {need / 2**30:.1f} GiB for one training "
            f"step ({model_config.n_layer} layers x {cfg.batch_size * T:,} tokens x width {model_config.n_embd}), "
            f"but this {device.type} has {have / 2**30:.1f} GiB: lower block_size or batch_size (grad_accum keeps "
            "the tokens per step)",
            param=param,
        )


def iters_per_epoch(cfg: TrainConfig, n_train: int, T: int, world: int = 1) -> int:
    """Optimizer steps in one pass over the training split (`world` processes each taking batch_size rows)."""
    B = cfg.batch_size * world
    if cfg.batch_mode == "sequential":
        windows = math.ceil((n_train // B - 1) / T)
    else:
        windows = n_train // (B * T)
    return max(1, windows // cfg.grad_accum)
