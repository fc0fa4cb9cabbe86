"""The model over rows of the paged KV pool: row b feeds feeds[b] at positions starts[b], starts[b] + 1, ...

The engine and its drafter run every forward through here. Rows whose feeds are short (a decode, a draft step,
a speculative check of k + 1 tokens) take the model's fused decode step (lmforge.infer.fused) when it has one, all
in one call whatever their lengths (each row computes its own tokens, no padding); anything else (prompt chunks,
models without the fused step) is one forward of the model over the rows right-padded to the longest.

`lora` (lmforge.infer.multi_lora.LoRABatch, None when every row is the base) gives each row its LoRA adapter, in
the fused step and the model's own forward alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch

from lmforge.engine.paged_cache import PagedKVCache, block_table_tensor
from lmforge.infer.multi_lora import LoRABatch


def hidden(
    model,
    cache: PagedKVCache,
    block_tables: Sequence[Sequence[int]],
    feeds: Sequence[Sequence[int]],
    starts: Sequence[int],
    long_rope: Sequence[bool] | None = None,
    lora: LoRABatch | None = None,
) -> torch.Tensor:
    """Hidden states (B, T, C) of the model's forward over the rows, right-padded to the longest feed T.

    long_rope: which rows' sequences are past LongRoPE's original context (lmforge.rope.long_rope_rows); None
    decides by the fed positions."""
    lengths = [len(f) for f in feeds]
    tokens = torch.zeros(len(feeds), max(lengths), dtype=torch.long)
    for b, f in enumerate(feeds):
        tokens[b, : len(f)] = torch.as_tensor(f)
    long = None if long_rope is None else list(long_rope)
    cache.prepare([list(t) for t in block_tables], list(starts), lengths, long)
    with lora or contextlib.nullcontext():
        return model.hidden(tokens.to(next(model.parameters()).device), kv_cache=cache)


def head(model, hidden_states: torch.Tensor, lora: LoRABatch | None = None) -> torch.Tensor:
    """The output head (soft-capped where the model's is) over hidden states (B, ..., C) of rows with adapters
    `lora`."""
    with lora or contextlib.nullcontext():
        return model.logits(hidden_states)


def logits(
    model,
    cache: PagedKVCache,
    block_tables: Sequence[Sequence[int]],
    feeds: Sequence[Sequence[int]],
    starts: Sequence[int],
    every_position: bool = False,
    long_rope: Sequence[bool] | None = None,
    lora: LoRABatch | None = None,
) -> torch.Tensor:
    """Logits at each row's last fed token (B, V), or with every_position at each fed token (B, T, V), rows
    shorter than the longest feed T padded with zeros."""
    lengths = [len(f) for f in feeds]
    T = max(lengths)
    fused = getattr(model, "fused_decoder", None)
    if fused is None or not fused.accepts(cache, T):
        h = hidden(model, cache, block_tables, feeds, starts, long_rope, lora)
        if not every_position:
            h = h[torch.arange(len(feeds)), torch.tensor(lengths) - 1]
        return head(model, h, lora)
    out = fused.paged(
        feeds, cache, block_table_tensor(block_tables), starts, T if every_position else 1, long_rope, lora=lora
    )  # rows of different lengths in one call, none of them padded (the fused step's `lengths`)
    return out if every_position else out[:, 0]
