"""Fine-tuning: a trained base model plus examples in, a fine-tuned model (or a LoRA adapter) out.

`finetune(config)` reads the examples of `config.data` (lmforge.apps.sft: chat or text files; or pass `Example`s:
token ids + a mask of the tokens whose prediction is trained), trains, and writes a run folder:

    OUT/best/              full fine-tuning, or LoRA with merge: the model folder with the best validation loss
    OUT/adapter/           LoRA: the adapter folder (PEFT's format, lmforge.interop.peft) with the best validation loss
    OUT/metrics.jsonl      one line per logged iteration (iter, loss, lr) and per evaluation (iter, val_loss)
    OUT/loss.png, OUT/finetune.yaml (the settings, which `--config` reads back), OUT/summary.json

Both carry the chat template the data was rendered with (tokenizer_config.json), so `chat` and `serve` prompt
the tuned model the way it was trained. Batches are right-padded to their longest example (examples of similar
length are batched together) and the loss is the mean cross-entropy over masked tokens only; the output head runs
only at those positions. The loop is lmforge.train.loop's: a budget of epochs, iterations or minutes, whichever
ends first, evaluation every `eval_interval` steps and at the end, early stopping after `patience` evaluations
without improvement, the best weights kept in memory; a stop request (Ctrl-C) ends it early with the best so far
written.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
import time
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge import lora
from lmforge.apps.sft import Example, read_examples
from lmforge.checkpoint import save_model
from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_write_text
from lmforge.interop.peft import save_adapter
from lmforge.settings import check_choices, write_config
from lmforge.templates import JINJA_FILE
from lmforge.train.loop import Loop, budget_steps, claim_run_folder, prepare_run_folder, stop_on_signals
from lmforge.train.metrics import MetricsLog, plot_losses
from lmforge.train.optim import Schedule, make_optimizer, set_lr

IGNORE = -100
TOKENIZER_CONFIG = "tokenizer_config.json"
OUTPUTS = (
    "best",
    "adapter",
    "metrics.jsonl",
    "loss.png",
    "summary.json",
    "finetune.yaml",
    "finetune_args.json",
    "tensorboard",
)


class FinetuneError(LmforgeError):
    """A fine-tuning setting out of range, or missing; the message names it."""


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run."""

    base: str
    """The model to start from: lmforge model or run folder, Hugging Face folder, or llama2.c .bin."""
    _: KW_ONLY
    out: str
    """The run folder to write: best/ (full, or LoRA with --merge), adapter/ (LoRA), metrics.jsonl."""
    data: str | None = None
    """The training data file: .jsonl lines of {"messages": [...]} (chat: only the assistant's tokens are trained)
    or {"text": ...}, or plain text (every token trained). From Python, examples may be passed instead."""
    val_data: str | None = None
    """Held-out data file; without it a fixed fraction of the data is held out (val_fraction)."""
    val_fraction: float = 0.1
    """The fraction of the data held out (seeded) for validation when val_data is not given (0: none)."""
    method: Literal["lora", "full"] = "lora"
    """full trains every weight; lora freezes the base and trains low-rank adapters."""
    lr: float | None = None
    """Peak learning rate. Unset: 1e-3 for lora, 1e-4 for full."""
    epochs: float | None = None
    """Budget: passes over the training examples. If no budget is set: 1 epoch."""
    max_iters: int | None = None
    """Budget: optimizer steps."""
    max_minutes: float | None = None
    """Budget: wall-clock minutes of training."""
    batch_size: int = 8
    """Examples per optimizer step."""
    eval_interval: int = 50
    """Evaluate on the validation examples every this many steps, and at the end; the best weights are kept."""
    patience: int | None = None
    """Stop after this many evaluations without a better validation loss."""
    warmup_iters: int = 10
    """Steps of linear learning-rate warmup (then cosine decay to lr/10 when the step budget is known)."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (LoRA's A and B included)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    seed: int = 1337
    """Seeds the validation split, LoRA's init, dropout and the batch order."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_targets: list[str] = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))
    """Adapted modules: attn.qkv, attn.proj, mlp.fc, mlp.proj (in every block) and/or lm_head."""
    merge: bool = False
    """LoRA: also write the adapter merged into the base, as a normal model folder OUT/best."""
    tokenizer: str | None = None
    """A tokenizer (tokenizer.json, folder or llama2.c .bin) to use instead of the base's own."""
    chat_template: str | None = None
    """A file holding a Jinja chat template to render the data with and save with the result. Unset: the base's
    template (or the default)."""
    num_threads: int | None = None
    """torch.set_num_threads for the run. Unset: PyTorch's default."""
    logger: Literal["tensorboard"] | None = None
    """Also log every metric to TensorBoard event files in OUT/tensorboard (needs the tensorboard package)."""
    overwrite: bool = False
    """Start over in an `out` that holds an earlier run, deleting its results."""

    def check(self) -> None:
        check_choices(self, FinetuneError)
        for name in ("batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise FinetuneError(f"{{param}}={getattr(self, name)} must be >= 1", param=name)
        for name in ("epochs", "max_iters", "max_minutes", "patience", "lr", "num_threads"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise FinetuneError(f"{{param}}={value} must be > 0", param=name)
        if not 0 <= self.val_fraction < 1:
            raise FinetuneError(f"{{param}}={self.val_fraction} must be in [0, 1)", param="val_fraction")


# ------------------------------------------------------------------------------------------------ loading


def load_base(base: str, tokenizer: str | None = None):
    """(model, tokenizer, chat template source) of a base model, as `finetune` loads it."""
    from lmforge.loader import load

    loaded = load(base, tokenizer=tokenizer, prepare=False)
    return loaded.model, loaded.tokenizer, loaded.chat_template().source


def read_template(path: str | None) -> str | None:
    if path is None:
        return None
    if not Path(path).is_file():
        raise FinetuneError(f"{{param}} file not found: {path}", param="chat_template")
    return Path(path).read_text(encoding="utf-8")


def read_data(config: FinetuneConfig, tok, template: str, block_size: int) -> tuple[list[Example], list[Example]]:
    """(train, validation) examples of config.data: val_data's, or a seeded val_fraction of data's."""
    if config.data is None:
        raise FinetuneError("fine-tuning needs {param} FILE (chat or text lines)", param="data")
    examples = read_examples(config.data, tok, template, block_size)
    if config.val_data is not None:
        return examples, read_examples(config.val_data, tok, template, block_size)
    return split_examples(examples, config.val_fraction, config.seed)


# ------------------------------------------------------------------------------------------------ batches


def collate(examples: list[Example], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), both (B, T), right-padded: targets[b, t] = ids[t + 1] where trained, else -100."""
    T = max(len(e.ids) for e in examples) - 1
    inputs = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.ids) - 1
        inputs[b, :n] = torch.as_tensor(e.ids[:-1])
        trained = torch.as_tensor(e.mask[1:], dtype=torch.bool)
        targets[b, :n] = torch.where(trained, torch.as_tensor(e.ids[1:]), IGNORE)
    return inputs, targets


def masked_loss(model, batch: tuple[torch.Tensor, torch.Tensor], reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over the trained targets only; the output head runs at those positions alone."""
    inputs, targets = batch
    device = next(model.parameters()).device
    inputs, targets = inputs.to(device), targets.to(device)
    keep = targets != IGNORE
    hidden = model.hidden(inputs)[keep]  # (N, C)
    return F.cross_entropy(model.logits(hidden).float(), targets[keep], reduction=reduction)


@torch.no_grad()
def evaluate_examples(model, examples: list[Example], batch_size: int = 16) -> float:
    """Mean loss per trained token (nats) over `examples`, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i : i + batch_size]])
        n = int((batch[1] != IGNORE).sum())
        if n:
            total += float(masked_loss(model, batch, reduction="sum"))
            count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("the evaluation examples hold no trained tokens")
    return total / count


def fit_context(examples: list[Example], max_ids: int) -> tuple[list[Example], int]:
    """Examples cut to max_ids tokens; those left with nothing to train are dropped. Returns (kept, dropped)."""
    kept = [Example(e.ids[:max_ids], e.mask[:max_ids]) for e in examples]
    kept = [e for e in kept if len(e.ids) >= 2 and e.n_targets > 0]
    return kept, len(examples) - len(kept)


def epoch_batches(examples: list[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """One epoch of batches: shuffled, then sorted by length within pools of 32 batches (less padding), with
    the batches themselves shuffled again."""
    order = list(range(len(examples)))
    rng.shuffle(order)
    pool = batch_size * 32
    batches = []
    for i in range(0, len(order), pool):
        chunk = sorted(order[i : i + pool], key=lambda j: len(examples[j].ids))
        batches += [[examples[j] for j in chunk[k : k + batch_size]] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------------------ saving


def tokenizer_config(extras: dict[str, bytes], template: str) -> bytes:
    """The base's tokenizer_config.json (if any) with `chat_template` set to the template trained with."""
    config = json.loads(extras[TOKENIZER_CONFIG]) if TOKENIZER_CONFIG in extras else {}
    config["chat_template"] = template
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------ the loop


def finetune(
    config: FinetuneConfig,
    train_examples: list[Example] | None = None,
    val_examples: list[Example] | None = None,
    on_eval=None,
    stop=None,
) -> dict:
    """Fine-tune config.base on config.data (or on the examples given) and write config.out; return a summary
    (see the module docstring).

    `on_eval(iteration, val_loss)`, when given, is called after each evaluation; `stop`, an Event, ends training
    after the current step when set (the best weights so far are still written).
    """
    from lmforge.loader import load

    config.check()
    out = Path(config.out)
    claim_run_folder(out, OUTPUTS, overwrite=config.overwrite, can_resume=False)
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    t0 = time.time()
    base = load(config.base, tokenizer=config.tokenizer, prepare=False)
    model, tok, extras = base.model, base.tokenizer, base.extras
    template = read_template(config.chat_template) or base.chat_template().source
    extras = {k: v for k, v in extras.items() if k != JINJA_FILE}  # the template travels in tokenizer_config.json
    if train_examples is None:
        train_examples, val_examples = read_data(config, tok, template, model.config.block_size)
    max_ids = model.config.block_size + 1
    train_examples, dropped = fit_context(list(train_examples), max_ids)
    if not train_examples:
        raise FinetuneError(
            "no training examples with trained tokens (after fitting them to the model's context "
            f"of {model.config.block_size} tokens)",
            param="data",
        )
    val_examples, dropped_val = fit_context(list(val_examples or []), max_ids)

    torch.manual_seed(config.seed)
    digest = lora.base_digest(model) if config.method == "lora" else None
    base_params = lora.count_params(model)[1]
    if config.method == "lora":
        lora.add_lora(model, config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets)
    trainable = lora.count_params(model)[0]
    total = base_params + (trainable if config.method == "lora" else 0)  # an untied head's frozen copy not counted
    lr = config.lr or (1e-3 if config.method == "lora" else 1e-4)
    optimizer = make_optimizer(model, "adamw", lr, config.weight_decay)
    steps_per_epoch = math.ceil(len(train_examples) / config.batch_size)
    epochs = config.epochs if config.epochs or config.max_iters or config.max_minutes else 1.0
    max_iters = budget_steps(config.max_iters, epochs, steps_per_epoch)
    schedule = Schedule("cosine", lr, min(config.warmup_iters, max_iters or 10**9), max_iters or 1, lr / 10)

    prepare_run_folder(out, OUTPUTS, overwrite=config.overwrite)
    write_config(
        out / "finetune.yaml",
        config,
        exclude=("overwrite",),
        header="lmforge finetune: the settings of this run (`lmforge finetune --config` reads them)",
    )
    log = MetricsLog(out / "metrics.jsonl", keep_until=0, logger=config.logger)
    trained = [p for p in model.parameters() if p.requires_grad]

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    base_val = evaluate_examples(model, val_examples) if val_examples else None
    best_state = snapshot()
    if base_val is not None:
        log.write({"iter": 0, "val_loss": base_val})

    def evaluate() -> None:
        nonlocal best_state
        val = evaluate_examples(model, val_examples)
        log.write({"iter": loop.it, "val_loss": val})
        if loop.observe(val):
            best_state = snapshot()
        if on_eval is not None:
            on_eval(loop.it, val)

    def log_train() -> None:
        log.write({"iter": loop.it, "loss": sum(running) / len(running), "lr": optimizer.param_groups[0]["lr"]})
        running.clear()

    rng = random.Random(config.seed)
    stream = itertools.chain.from_iterable(
        epoch_batches(train_examples, config.batch_size, rng) for _ in itertools.count()
    )
    running: list[float] = []
    loop = Loop(
        max_iters=max_iters,
        max_minutes=config.max_minutes,
        eval_interval=config.eval_interval if val_examples else 0,
        patience=config.patience,
        stop=stop,
    )
    model.train()
    try:
        while loop.running():
            set_lr(optimizer, schedule.lr_at(loop.it, loop.time_fraction()))
            loss = masked_loss(model, collate(next(stream)))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            loop.step_done()
            running.append(loss.item())
            if loop.it % 10 == 0:
                log_train()
            if loop.eval_due():
                evaluate()
        if running:
            log_train()
        if val_examples and loop.final_eval_due():
            evaluate()
    finally:
        log.close()
    train_loss = loss.item() if loop.it > 0 else None
    if val_examples:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in best_state.items():
                params[name].copy_(value)
    model.eval()

    adapter_dir = model_dir = None
    tok_config = {TOKENIZER_CONFIG: tokenizer_config(extras, template)}
    if config.method == "lora":
        adapter_dir = save_adapter(out / "adapter", model, base=str(config.base), digest=digest, extra_files=tok_config)
        if config.merge:
            lora.merge_lora(model)
            model_dir = save_model(out / "best", model, tok, extra_files={**extras, **tok_config})
    else:
        model_dir = save_model(out / "best", model, tok, extra_files={**extras, **tok_config})
    plot_losses(log, out / "loss.png")
    summary = {
        "method": config.method,
        "iters": loop.it,
        "epochs": round(loop.it / steps_per_epoch, 3),
        "stop_reason": loop.stop_reason,
        "base_val_loss": base_val,
        "best_val_loss": loop.best if val_examples else None,
        "final_train_loss": train_loss,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_fraction": trainable / total,
        "train_examples": len(train_examples),
        "val_examples": len(val_examples),
        "dropped": dropped + dropped_val,
        "seconds": round(time.time() - t0, 2),
        "out": str(out),
        "model_dir": str(model_dir) if model_dir else None,
        "adapter_dir": str(adapter_dir) if adapter_dir else None,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def split_examples(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A fixed, seeded held-out split: (train, val); val gets round(fraction * n) examples, at least one."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(val_fraction * len(examples))) if val_fraction > 0 and len(examples) > 1 else 0
    return [examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]]


def finetune_command(config: FinetuneConfig) -> int:
    """Fine-tune a model on chat or text data, fully or with a LoRA adapter.

    Data: a .jsonl file of {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]} per line
    (rendered with the model's chat template; only assistant tokens are trained) or {"text": ...} per line, or
    any other file as plain text (every token trained). Ctrl-C stops after the current step and writes the best
    weights so far.
    """
    if config.data is None:
        raise FinetuneError("fine-tuning needs {param} FILE (chat or text lines)", param="data")

    def report(it: int, val: float) -> None:
        print(f"iter {it}: val loss {val:.4f}", flush=True)

    with stop_on_signals("fine-tuning") as stop:
        summary = finetune(config, on_eval=report, stop=stop)
    print(json.dumps(summary))
    if summary["stop_reason"] == "interrupted":
        print(
            f"interrupted at iteration {summary['iters']}: {config.out} holds the best weights so far", file=sys.stderr
        )
        return 128 + (stop.signum or 2)
    return 0
