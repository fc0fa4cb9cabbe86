"""Embeddings: one L2-normalised vector per input from a language model's final hidden states.

    token ids -> model.hidden (after the final norm): (B, T, C) -> pool over each input's tokens: (B, C) -> / ||.||

Pooling:
- "mean" (the default): the average of the input's token states. lmforge's models are next-token predictors,
  never tuned to summarise; in a causal model only the last position has seen the whole input, but its state is
  shaped to predict the next token, and averaging every position gives the better sentence vectors for such models
  (Muennighoff 2022, "SGPT: GPT Sentence Embeddings for Semantic Search": mean-style pooling over last-token for
  GPT models used as they are).
- "last": the state of the input's last token, what decoder models fine-tuned as embedders use (E5-Mistral,
  gte-Qwen: trained with an EOS appended, whose state is the embedding). Choose it for such models.

Inputs are batched by length (sorted, so padding stays small) and right-padded: a causal model's real positions
never attend to the padding after them, so an input's vector is the same in any batch, up to the rounding of
matrix products of other shapes (float32: ~1e-6). The vectors are float32 whatever the model's dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError

POOLINGS = ("mean", "last")
DEFAULT_POOLING = "mean"


class EmbeddingError(LmforgeError):
    """An input that cannot be embedded (empty, too long, unknown token ids) or an unknown pooling."""


def check_inputs(inputs: Sequence[Sequence[int]], vocab_size: int, context: int | None) -> None:
    """Every input holds 1..context token ids of the vocabulary; the error names the first bad one."""
    if not inputs:
        raise EmbeddingError("no inputs to embed", param="input")
    for i, ids in enumerate(inputs):
        if len(ids) == 0:
            raise EmbeddingError(f"input {i} is empty: there is nothing to embed", param="input")
        if context is not None and len(ids) > context:
            raise EmbeddingError(
                f"input {i} has {len(ids)} tokens but the model's context is {context}; shorten it", param="input"
            )
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise EmbeddingError(f"input {i} holds token ids outside the vocabulary 0..{vocab_size - 1}", param="input")


def pool(hidden: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, C) right-padded states, (B,) real lengths -> (B, C) pooled, L2-normalised, float32."""
    hidden = hidden.float()
    if pooling == "mean":
        real = torch.arange(hidden.shape[1], device=hidden.device)[None, :] < lengths[:, None]  # (B, T)
        vectors = (hidden * real[..., None]).sum(1) / lengths[:, None]
    elif pooling == "last":
        vectors = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
    else:
        raise EmbeddingError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}", param="pooling")
    return F.normalize(vectors, dim=-1)


@torch.inference_mode()
def embed(
    model, inputs: Sequence[Sequence[int]], pooling: str = DEFAULT_POOLING, max_batch_tokens: int = 4096
) -> torch.Tensor:
    """Embeddings (N, C), float32, of N token-id lists, in their order.

    Args:
        model: an lmforge Transformer (anything with `hidden(tokens)` and `config`).
        inputs: the token ids of each input.
        pooling: "mean" or "last" (see the module docstring).
        max_batch_tokens: padded tokens per forward at most (a longer input runs alone).
    """
    if pooling not in POOLINGS:
        raise EmbeddingError(f"pooling={pooling!r} is not one of {', '.join(POOLINGS)}", param="pooling")
    c = model.config
    check_inputs(inputs, c.vocab_size, None if c.pos == "sinusoidal" else c.block_size)
    device = next(model.parameters()).device
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = torch.empty(len(inputs), c.n_embd)
    start = 0
    while start < len(order):
        end = start + 1  # grow the batch while its padded size (rows x longest, sorted) fits
        while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= max_batch_tokens:
            end += 1
        rows = order[start:end]
        lengths = torch.tensor([len(inputs[i]) for i in rows])
        tokens = torch.zeros(len(rows), int(lengths.max()), dtype=torch.long)
        for b, i in enumerate(rows):
            tokens[b, : len(inputs[i])] = torch.as_tensor(list(inputs[i]))
        hidden = model.hidden(tokens.to(device))  # (B, T, C), causal: padding after an input never reaches it
        out[rows] = pool(hidden, lengths.to(device), pooling).cpu()
        start = end
    return out
