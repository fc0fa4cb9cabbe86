"""POST /v1/embeddings: the served model's embeddings (lmforge.infer.embed), computed on the engine's thread.

`input` is a string, a list of strings, a list of token ids or a list of such lists; each is one vector, pooled as
--embedding-pooling says (mean by default) and L2-normalised: the vectors `lmforge embed` and
`lmforge.apps.embed.embed_texts` give. `model` may name a served LoRA adapter: the vectors are then those of the
model with that adapter. `encoding_format` "base64" sends each vector's float32 little-endian bytes in base64 (as
OpenAI does); `dimensions` keeps the first `dimensions` components and normalises them again to unit length (what
OpenAI's shortened embeddings are; for models not trained for it, Matryoshka-style, a truncation that keeps less
of the meaning), and more than the model's width is a 400. `usage` counts the input tokens exactly.

Inputs are embedded in batches of similar length on the engine loop's thread (`EngineLoop.call`), one batch
between two decoding steps, so a large embedding request slows generation down by a step's worth at a time and
never holds it up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib

import torch
import torch.nn.functional as F
from fastapi import APIRouter, Request

from lmforge.infer.embed import embed
from lmforge.serve.errors import ApiError
from lmforge.serve.protocol import EmbeddingRequest
from lmforge.serve.routes import ServerDep

MAX_INPUTS = 2048  # inputs per request at most (OpenAI's limit)
router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(req: EmbeddingRequest, http: Request, server: ServerDep):
    adapter = server.check_model(req.model)
    width = server.config.n_embd
    if req.dimensions is not None and req.dimensions > width:
        raise ApiError(
            400, f"dimensions={req.dimensions} is more than the model's {width}; ask for at most {width}", "dimensions"
        )
    inputs = await input_ids(server, req.input)
    tokens = sum(map(len, inputs))
    reservation = server.rate.reserve(http.scope["lmforge.api_key"], tokens, "input")
    vectors = await embed_on_engine(server, inputs, adapter)
    server.rate.settle(reservation, tokens)
    if req.dimensions is not None:
        vectors = F.normalize(vectors[:, : req.dimensions], dim=-1)
    data = [
        {"object": "embedding", "index": i, "embedding": encoded(v, req.encoding_format)} for i, v in enumerate(vectors)
    ]
    return {
        "object": "list",
        "data": data,
        "model": req.model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


async def input_ids(server, value) -> list[list[int]]:
    """The `input` field as token id lists, each checked (400 naming input[i])."""
    if isinstance(value, str) or (value and all(isinstance(t, int) for t in value)):
        value = [value]
    if not value:
        raise ApiError(400, "input is empty: give a string, a list of strings, or token ids", "input")
    if len(value) > MAX_INPUTS:
        raise ApiError(400, f"input holds {len(value)} items; at most {MAX_INPUTS} per request", "input")
    texts = [v for v in value if isinstance(v, str)]
    encoded_texts = iter(await asyncio.to_thread(server.tokenizer.encode_batch, texts)) if texts else iter(())
    out = []
    for i, v in enumerate(value):
        ids = next(encoded_texts).tolist() if isinstance(v, str) else list(v)
        if not ids:
            raise ApiError(400, f"input[{i}] is empty: there is nothing to embed", f"input[{i}]")
        if len(ids) > server.max_model_len:
            raise ApiError(
                400,
                f"input[{i}] is {len(ids)} tokens; the model takes at most {server.max_model_len}",
                f"input[{i}]",
                code="context_length_exceeded",
            )
        if min(ids) < 0 or max(ids) >= server.vocab_size:
            raise ApiError(
                400, f"input[{i}] holds token ids outside the vocabulary 0..{server.vocab_size - 1}", f"input[{i}]"
            )
        out.append(ids)
    return out


async def embed_on_engine(server, inputs: list[list[int]], adapter: str | None) -> torch.Tensor:
    """Vectors (N, C) of the inputs, batches of similar length (up to the engine's per-step token budget, or
    one input) each computed between two engine steps."""
    budget = max(server.max_num_batched_tokens, max(map(len, inputs)))
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i]))
    out = torch.empty(len(inputs), server.config.n_embd)
    start = 0
    while start < len(order):
        end = start + 1  # sorted: rows x the longest so far is the batch's padded size
        while end < len(order) and (end + 1 - start) * len(inputs[order[end]]) <= budget:
            end += 1
        rows = order[start:end]
        batch = [inputs[i] for i in rows]
        work = server.loop.call(embed_batch, batch, adapter, server.settings.embedding_pooling, budget)
        out[rows] = await asyncio.wrap_future(work)
        start = end
    return out


def embed_batch(engine, batch: list[list[int]], adapter: str | None, pooling: str, budget: int) -> torch.Tensor:
    """(On the engine's thread, wherever it runs) the vectors of one batch, through its LoRA adapter if any."""
    lora = engine.adapters.batch([adapter] * len(batch)) if engine.adapters is not None else None
    with lora or contextlib.nullcontext():
        return embed(engine.model, batch, pooling, max_batch_tokens=budget)


def encoded(vector: torch.Tensor, encoding_format: str):
    """A vector as OpenAI sends it: a list of floats, or base64 of its float32 little-endian bytes."""
    if encoding_format == "base64":
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
    return vector.tolist()
