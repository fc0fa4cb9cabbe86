"""The `lmforge embed` verb: texts in, one L2-normalised vector per text out (JSON lines).

The vectors are lmforge.infer.embed's (mean pooling of the final hidden states by default; see there why), the
model comes from lmforge.loader; `lmforge serve` answers POST /v1/embeddings with the same vectors.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

import torch

from lmforge.infer.embed import DEFAULT_POOLING, EmbeddingError, embed
from lmforge.loader import load


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text's token ids as the model's tokenizer encodes it (no special tokens added)."""
    if tokenizer is None:
        raise EmbeddingError("this model has no tokenizer to encode text; pass --tokenizer PATH", param="tokenizer")
    return [tokenizer.encode(t) for t in texts]


def embed_texts(model, tokenizer, texts: list[str], pooling: str = DEFAULT_POOLING) -> torch.Tensor:
    """Embeddings (N, C), float32, of texts: the Python function behind `lmforge embed` and /v1/embeddings."""
    return embed(model, encode_texts(tokenizer, texts), pooling)


def embed_command(
    model: str,
    input: list[str] = [],  # noqa: B006  (the CLI's default; never mutated)
    file: str | None = None,
    pooling: Literal["mean", "last"] = DEFAULT_POOLING,
    tokenizer: str | None = None,
    dtype: Literal["float32", "bfloat16"] = "float32",
    quantize: Literal["int8"] | None = None,
    adapter: str | None = None,
) -> int:
    """Embed texts with a model: one JSON line per text, {"index", "tokens", "pooling", "embedding"}.

    Args:
        model: model folder, training run, Hugging Face folder or llama2.c file.
        input: texts to embed.
        file: a file with one text per line (embedded after --input's).
        pooling: mean: the average of the final hidden states over the text's tokens (the default: lmforge's
            models are next-token predictors, and the mean summarises them best); last: the last token's state
            (for decoder models fine-tuned as embedders).
        tokenizer: tokenizer.json or folder to use instead of the model's own.
        dtype: weights and activations dtype (the vectors are float32).
        quantize: quantize the weights on load (int8).
        adapter: a LoRA adapter folder merged into the model on load.
    """
    texts = list(input)
    if file is not None:
        path = Path(file)
        if not path.is_file():
            raise FileNotFoundError(f"--file {path} does not exist")
        texts += [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise EmbeddingError("nothing to embed: give --input TEXT ... or --file FILE", param="input")
    loaded = load(model, dtype=dtype, quantize=quantize, adapter=adapter, tokenizer=tokenizer)
    ids = encode_texts(loaded.tokenizer, texts)
    for i, (tokens, vector) in enumerate(zip(ids, embed(loaded.model, ids, pooling))):
        print(
            json.dumps({"index": i, "tokens": len(tokens), "pooling": pooling, "embedding": vector.tolist()}),
            file=sys.stdout,
            flush=True,
        )
    return 0
