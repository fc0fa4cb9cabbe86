"""Evaluation: loss, perplexity and (for character data) bits per character on a prepared split.

By default the split is cut into non-overlapping windows of the model's context, as the PyTorch
word_language_model example evaluates, so early tokens of each window see little context. A stride shorter
than the context slides the window and scores only each window's last `stride` targets: every token is
scored once, with at least `block_size - stride` tokens of context (slower, lower perplexity).
"""

from __future__ import annotations

import json
import math
import time

import torch
import torch.nn.functional as F

from lmforge.data import eval_windows, load_meta, load_split


@torch.inference_mode()
def evaluate(model: torch.nn.Module, data, *, block_size: int | None = None, stride: int | None = None,
             batch_size: int = 16, max_windows: int | None = None) -> dict:
    """Mean next-token loss over `data` (a 1-D token array), with perplexity. Returns loss, ppl, tokens."""
    block_size = block_size or model.config.block_size
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for i, (x, y, mask) in enumerate(eval_windows(data, block_size, stride, batch_size)):
        if max_windows is not None and i * batch_size >= max_windows:
            break
        logits = model(x.to(device)).float()  # (B, T, V)
        ce = F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten(), reduction="none")
        mask = mask.to(device).flatten()
        loss_sum += float((ce * mask).sum())
        count += int(mask.sum())
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


def eval_command(model: str, data: str, split: str = "val", block_size: int | None = None,
                 stride: int | None = None, batch_size: int = 16) -> int:
    """Report loss, perplexity and, for character data, bits per character of a model on a prepared split.

    Args:
        model: a model folder or training run (its best/ checkpoint), quantized ones included.
        data: a data folder made by `lmforge prepare` with the model's tokenizer.
        split: which split to score (train, val or test, as prepared).
        block_size: window length (default: the model's context).
        stride: slide windows by this many tokens and score only the last `stride` of each (default:
            non-overlapping windows).
        batch_size: windows per forward pass.
    """
    from lmforge.interop import load_any

    net, _ = load_any(model)
    meta = load_meta(data)
    if meta["vocab_size"] > net.config.vocab_size:
        raise ValueError(f"data in {data} has a vocabulary of {meta['vocab_size']} tokens but the model knows "
                         f"{net.config.vocab_size}: prepare the data with the model's tokenizer "
                         f"(`lmforge prepare ... --tokenizer-from {model}`)")
    tokens = load_split(data, split)
    t0 = time.perf_counter()
    result = evaluate(net, tokens, block_size=block_size, stride=stride, batch_size=batch_size)
    result.update(model=model, split=split, quantization=net.config.quantization,
                  seconds=round(time.perf_counter() - t0, 2))
    if meta.get("tokenizer") == "char":
        result["bpc"] = result["loss"] / math.log(2)
    print(json.dumps(result))
    return 0
