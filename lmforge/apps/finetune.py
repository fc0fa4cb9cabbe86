"""Fine-tuning: a trained base model plus examples in, a fine-tuned model (or a LoRA adapter) out.

`finetune(config, train_examples, val_examples)` trains on `Example`s (token ids + a mask of the tokens whose
prediction is trained; lmforge.apps.sft makes them from chat or text files) and writes a run folder:

    OUT/best/              full fine-tuning, or LoRA with merge: the model folder with the best validation loss
    OUT/adapter/           LoRA: the adapter folder (lmforge.lora) with the best validation loss
    OUT/metrics.jsonl      one line per logged iteration (iter, loss, lr) and per evaluation (iter, val_loss)
    OUT/loss.png, OUT/finetune_args.json, OUT/summary.json

Both carry the chat template the data was rendered with (tokenizer_config.json), so `chat` and `serve` prompt
the tuned model the way it was trained. Batches are right-padded to their longest example (examples of similar
length are batched together) and the loss is the mean cross-entropy over masked tokens only; the output head runs
only at those positions. The budget is epochs, iterations or minutes, whichever ends first, with early stopping
after `patience` evaluations without improvement.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from lmforge import lora
from lmforge.apps.sft import Example, read_examples
from lmforge.checkpoint import save_model
from lmforge.fsutil import atomic_write_text
from lmforge.train.optim import Schedule, make_optimizer, set_lr
from lmforge.train.trainer import MetricsLog, plot_losses

IGNORE = -100
TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclass
class FinetuneConfig:
    """Every setting of a fine-tuning run."""

    base: str
    """The model to start from: lmforge model/run folder, Hugging Face folder or llama2.c .bin."""
    out: str
    """The run folder to write (best/ or adapter/, metrics.jsonl, summary.json)."""
    method: str = "lora"
    """full: train every weight; lora: freeze the base and train low-rank adapters."""
    lr: float | None = None
    """Peak learning rate. None: 1e-3 for lora, 1e-4 for full."""
    epochs: float | None = None
    """Budget: passes over the training examples. If no budget is set: 1 epoch."""
    max_iters: int | None = None
    """Budget: optimizer steps."""
    max_minutes: float | None = None
    """Budget: wall-clock minutes of training."""
    batch_size: int = 8
    """Examples per optimizer step."""
    eval_interval: int = 50
    """Evaluate on the validation examples every this many steps, and at the end."""
    patience: int | None = None
    """Stop after this many evaluations without a better validation loss."""
    warmup_iters: int = 10
    """Steps of linear learning-rate warmup (then cosine decay to lr/10 when the step budget is known)."""
    weight_decay: float = 0.0
    """AdamW weight decay on matrices (LoRA's A and B included)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: off)."""
    seed: int = 1337
    """Seeds LoRA's init, dropout and the batch order."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    lora_dropout: float = 0.0
    """Dropout on the LoRA branch's input."""
    lora_targets: list[str] = field(default_factory=lambda: list(lora.DEFAULT_TARGETS))
    """Adapted modules: attn.qkv, attn.proj, mlp.fc, mlp.proj (in every block) and/or lm_head."""
    merge: bool = False
    """LoRA: also write the adapter merged into the base as a model folder, OUT/best/."""
    tokenizer: str | None = None
    """A tokenizer to use instead of the base's own."""
    chat_template: str | None = None
    """Jinja chat template source to save with the result. None: the base's template (or the default)."""

    def check(self) -> None:
        if self.method not in ("full", "lora"):
            raise ValueError(f"method={self.method!r}: choose 'full' or 'lora'")
        for name in ("batch_size", "eval_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in ("epochs", "max_iters", "max_minutes", "patience"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value} must be > 0")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


# ------------------------------------------------------------------------------------------------ loading

def load_base(base: str, tokenizer: str | None = None):
    """(model, tokenizer, chat template source) of a base model, as `finetune` loads it."""
    from lmforge.loader import load

    loaded = load(base, tokenizer=tokenizer, prepare=False)
    return loaded.model, loaded.tokenizer, loaded.chat_template().source


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
    return F.cross_entropy(model.lm_head(hidden).float(), targets[keep], reduction=reduction)


@torch.no_grad()
def evaluate_examples(model, examples: list[Example], batch_size: int = 16) -> float:
    """Mean loss per trained token (nats) over `examples`, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    for i in range(0, len(order), batch_size):
        batch = collate([examples[j] for j in order[i:i + batch_size]])
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
        chunk = sorted(order[i:i + pool], key=lambda j: len(examples[j].ids))
        batches += [[examples[j] for j in chunk[k:k + batch_size]] for k in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


# ------------------------------------------------------------------------------------------------ saving

def tokenizer_config(extras: dict[str, bytes], template: str) -> bytes:
    """The base's tokenizer_config.json (if any) with `chat_template` set to the template trained with."""
    config = json.loads(extras[TOKENIZER_CONFIG]) if TOKENIZER_CONFIG in extras else {}
    config["chat_template"] = template
    return (json.dumps(config, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


# ------------------------------------------------------------------------------------------------ the loop

def finetune(config: FinetuneConfig, train_examples: list[Example], val_examples: list[Example] | None = None,
             on_eval=None) -> dict:
    """Fine-tune config.base on the examples and write config.out; return a summary (see the module docstring).

    `on_eval(iteration, val_loss)`, when given, is called after each evaluation.
    """
    from lmforge.loader import load

    config.check()
    t0 = time.time()
    base = load(config.base, tokenizer=config.tokenizer, prepare=False)
    model, tok, extras = base.model, base.tokenizer, base.extras
    template = config.chat_template or base.chat_template().source
    max_ids = model.config.block_size + 1
    train_examples, dropped = fit_context(list(train_examples), max_ids)
    if not train_examples:
        raise ValueError("no training examples with trained tokens (after fitting them to the model's context "
                         f"of {model.config.block_size} tokens)")
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
    budget = [n for n in (config.max_iters, epochs and math.ceil(epochs * steps_per_epoch)) if n]
    max_iters = min(budget) if budget else None
    schedule = Schedule("cosine", lr, min(config.warmup_iters, max_iters or 10**9), max_iters or 1, lr / 10)

    def time_fraction() -> float | None:
        """The share of the minutes spent when time is the only budget: the cosine then decays over the minutes."""
        return None if max_iters is not None else (time.time() - train_t0) / (60 * config.max_minutes)

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "finetune_args.json", json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    log = MetricsLog(out / "metrics.jsonl", keep_until=0)
    trained = [p for p in model.parameters() if p.requires_grad]

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    base_val = evaluate_examples(model, val_examples) if val_examples else None
    best_val, best_state, bad_evals = math.inf, snapshot(), 0
    if base_val is not None:
        log.write({"iter": 0, "val_loss": base_val})
    rng = random.Random(config.seed)
    it, running, stop = 0, [], False
    train_t0 = time.time()
    model.train()
    while not stop:
        for batch in epoch_batches(train_examples, config.batch_size, rng):
            set_lr(optimizer, schedule.lr_at(it, time_fraction()))
            loss = masked_loss(model, collate(batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            it += 1
            running.append(loss.item())
            out_of_time = config.max_minutes is not None and time.time() - train_t0 > 60 * config.max_minutes
            done = (max_iters is not None and it >= max_iters) or out_of_time
            if it % 10 == 0 or done:
                log.write({"iter": it, "loss": sum(running) / len(running), "lr": optimizer.param_groups[0]["lr"]})
                running = []
            if val_examples and (it % config.eval_interval == 0 or done):
                val = evaluate_examples(model, val_examples)
                log.write({"iter": it, "val_loss": val})
                if val < best_val:
                    best_val, best_state, bad_evals = val, snapshot(), 0
                else:
                    bad_evals += 1
                if on_eval is not None:
                    on_eval(it, val)
                if config.patience is not None and bad_evals >= config.patience:
                    done = True
            if done:
                stop = True
                break
    train_loss = loss.item()
    if val_examples:
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, value in best_state.items():
                params[name].copy_(value)
    model.eval()

    adapter_dir = model_dir = None
    tok_config = {TOKENIZER_CONFIG: tokenizer_config(extras, template)}
    if config.method == "lora":
        adapter_dir = lora.save_adapter(out / "adapter", model, base=str(config.base), digest=digest,
                                        extra_files=tok_config)
        if config.merge:
            lora.merge_lora(model)
            model_dir = save_model(out / "best", model, tok, extra_files={**extras, **tok_config})
        else:
            shutil.rmtree(out / "best", ignore_errors=True)  # a stale full model from an earlier run
    else:
        model_dir = save_model(out / "best", model, tok, extra_files={**extras, **tok_config})
        shutil.rmtree(out / "adapter", ignore_errors=True)
    plot_losses(log, out / "loss.png")
    summary = {"method": config.method, "iters": it, "epochs": round(it / steps_per_epoch, 3),
               "base_val_loss": base_val, "best_val_loss": best_val if val_examples else None,
               "final_train_loss": train_loss, "trainable_params": trainable, "total_params": total,
               "trainable_fraction": trainable / total, "train_examples": len(train_examples),
               "val_examples": len(val_examples), "dropped": dropped + dropped_val,
               "seconds": round(time.time() - t0, 2), "out": str(out),
               "model_dir": str(model_dir) if model_dir else None,
               "adapter_dir": str(adapter_dir) if adapter_dir else None}
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


def finetune_command(base: str, data: str | None = None, out: str | None = None,
                     method: Literal["lora", "full"] = "lora", val_data: str | None = None, val_fraction: float = 0.1,
                     lr: float | None = None, epochs: float | None = None, max_iters: int | None = None,
                     max_minutes: float | None = None, batch_size: int = 8, eval_interval: int = 50,
                     patience: int | None = None, lora_rank: int = 8, lora_alpha: float = 16.0,
                     lora_dropout: float = 0.0, lora_targets: list[str] = list(lora.DEFAULT_TARGETS),
                     merge: bool = False, tokenizer: str | None = None, chat_template: str | None = None,
                     seed: int = 1337, num_threads: int | None = None) -> int:
    """Fine-tune a model on chat or text data, fully or with a LoRA adapter.

    Data: a .jsonl file of {"messages": [{"role": "user"|"assistant"|"system", "content": ...}, ...]} per line
    (rendered with the model's chat template; only assistant tokens are trained) or {"text": ...} per line, or
    any other file as plain text (every token trained).

    Args:
        base: the model to start from: lmforge model or run folder, Hugging Face folder, or llama2.c .bin.
        data: the training data file (.jsonl chat/text, or plain text).
        out: the run folder to write: best/ (full, or LoRA with --merge), adapter/ (LoRA), metrics.jsonl.
        method: full trains every weight; lora freezes the base and trains low-rank adapters.
        val_data: held-out data file; without it a fixed fraction of --data is held out.
        val_fraction: the fraction of --data held out for validation when --val-data is not given (0: none).
        lr: peak learning rate (default 1e-3 for lora, 1e-4 for full).
        epochs: budget: passes over the training data (1 when no budget is given).
        max_iters: budget: optimizer steps.
        max_minutes: budget: wall-clock minutes.
        batch_size: examples per optimizer step.
        eval_interval: evaluate every this many steps (and at the end); the best weights are kept.
        patience: stop after this many evaluations without improvement.
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha (the update is scaled by alpha / r).
        lora_dropout: dropout on the LoRA branch's input.
        lora_targets: modules to adapt: attn.qkv attn.proj mlp.fc mlp.proj lm_head.
        merge: LoRA: also write the base with the adapter merged in, as a normal model folder OUT/best.
        tokenizer: a tokenizer (tokenizer.json, folder or llama2.c .bin) to use instead of the base's own.
        chat_template: a file holding a Jinja chat template to train and save with (default: the base's).
        seed: random seed (split, LoRA init, batch order).
        num_threads: torch threads (default: PyTorch's).
    """
    if data is None or out is None:
        raise ValueError("finetune needs --data FILE and --out DIR")
    if num_threads:
        torch.set_num_threads(num_threads)
    template = None
    if chat_template is not None:
        path = Path(chat_template)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file not found: {path}")
        template = path.read_text(encoding="utf-8")
    model, tok, base_template = load_base(base, tokenizer)
    template = template or base_template
    block = model.config.block_size
    examples = read_examples(data, tok, template, block)
    if val_data is not None:
        train_ex, val_ex = examples, read_examples(val_data, tok, template, block)
    else:
        train_ex, val_ex = split_examples(examples, val_fraction, seed)
    del model
    config = FinetuneConfig(base=base, out=out, method=method, lr=lr, epochs=epochs, max_iters=max_iters,
                            max_minutes=max_minutes, batch_size=batch_size, eval_interval=eval_interval,
                            patience=patience, seed=seed, lora_rank=lora_rank, lora_alpha=lora_alpha,
                            lora_dropout=lora_dropout, lora_targets=list(lora_targets), merge=merge,
                            tokenizer=tokenizer, chat_template=template)
    print(f"finetune {method}: {len(train_ex)} train / {len(val_ex)} validation examples from {data}")

    def report(it: int, val: float) -> None:
        print(f"iter {it}: val loss {val:.4f}", flush=True)

    summary = finetune(config, train_ex, val_ex, on_eval=report)
    print(json.dumps(summary))
    return 0
