"""llama2.c checkpoints (github.com/karpathy/llama2.c, `run.c` and `export.py`); their tokenizer is
lmforge.tokenizer.Llama2cTokenizer.

Model file ("version 0", the legacy export `run.c` reads), all little-endian:
  header 7 x int32: dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
    (a negative vocab_size means an untied classifier follows the weights; its absolute value is the size)
  float32 tensors back to back, each per-layer tensor stored for all layers, layer 0 first:
    token embedding (V, C) | attention RMSNorm (L, C) | wq (L, C, C) | wk (L, kv, C) | wv (L, kv, C) |
    wo (L, C, C) | FFN RMSNorm (L, C) | w1 gate (L, H, C) | w2 down (L, C, H) | w3 up (L, H, C) |
    final RMSNorm (C,) | legacy RoPE tables 2 x (seq_len * hs/2), skipped | classifier (V, C) when untied
llama2.c rotates *interleaved* pairs (elements 2i, 2i+1 of each head); lmforge (like Hugging Face) rotates the
pairs (i, i + hs/2). Reordering the rows of wq and wk inside each head, evens first then odds, turns one into
the other: q.k is unchanged because q and k rows move together, and each pair keeps its frequency.

A model file does not name its tokenizer: `tokenizer_beside` finds the one llama2.c keeps next to it.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import torch

from lmforge.checkpoint import CheckpointError, load_state
from lmforge.config import ModelConfig
from lmforge.fsutil import published_digest_mismatch
from lmforge.model import Transformer

HEADER = struct.Struct("<7i")
MAGIC = 0x616B3432  # "ak42": llama2.c's newer versioned exports, which this reader does not take
TOKENIZER_NAMES = ("tok512.bin", "tokenizer.bin")  # looked for beside a model file
# sha256 of published model files (huggingface.co/karpathy/tinyllamas stories260K/, see
# shared/models/stories260K/SOURCE.md): a file with a known name must match.
PUBLISHED_SHA256 = {"stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696"}


def tokenizer_beside(model_file: Path) -> Path:
    """The llama2.c tokenizer file next to a model file (tok512.bin, else tokenizer.bin)."""
    for name in TOKENIZER_NAMES:
        if (model_file.parent / name).is_file():
            return model_file.parent / name
    raise FileNotFoundError(
        f"no tokenizer for the llama2.c model {model_file}: none of "
        f"{', '.join(TOKENIZER_NAMES)} is beside it; pass --tokenizer PATH "
        f"(the llama2.c tokenizer .bin the model was trained with)"
    )


# ---------------------------------------------------------------------------------------------- model


def read_header(path: Path, data: bytes) -> dict:
    """The 7 header ints, sanity-checked, as a dict (vocab_size made positive, `shared` from its sign)."""
    if len(data) < HEADER.size:
        raise CheckpointError(f"{path} is {len(data)} bytes, too short for the {HEADER.size}-byte llama2.c header")
    if struct.unpack_from("<I", data)[0] == MAGIC:
        raise CheckpointError(
            f"{path} is a versioned llama2.c export (magic 'ak42'); lmforge reads the legacy "
            f"format (llama2.c export.py --version 0)"
        )
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(data)
    h = dict(
        dim=dim,
        hidden_dim=hidden,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        vocab_size=abs(vocab),
        seq_len=seq_len,
        shared=vocab > 0,
    )
    limit = 1 << 20
    bad = [f"{k}={v}" for k, v in h.items() if k != "shared" and not 0 < v <= limit]
    if bad or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise CheckpointError(
            f"{path} does not start with a llama2.c header: read {', '.join(f'{k}={v}' for k, v in h.items())} "
            f"(each must be in 1..{limit}, dim divisible by n_heads, n_heads by n_kv_heads, head size even)"
            + (f"; out of range: {', '.join(bad)}" if bad else "")
        )
    return h


def tensor_shapes(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 tensors of the file, in file order (the RoPE tables included, as `rope`)."""
    C, H, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    hs = C // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    shapes = [
        ("tok_emb", (V, C)),
        ("norm1", (L, C)),
        ("wq", (L, C, C)),
        ("wk", (L, kv, C)),
        ("wv", (L, kv, C)),
        ("wo", (L, C, C)),
        ("norm2", (L, C)),
        ("w1", (L, H, C)),
        ("w2", (L, C, H)),
        ("w3", (L, H, C)),
        ("norm_f", (C,)),
        ("rope", (2, h["seq_len"] * hs // 2)),
    ]
    if not h["shared"]:
        shapes.append(("classifier", (V, C)))
    return shapes


def interleaved_to_half_split(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection (n_heads * hs, C) per head: rows 0, 2, 4, ..., then 1, 3, 5, ..."""
    out, C = w.shape
    hs = out // n_heads
    return w.view(n_heads, hs // 2, 2, C).transpose(1, 2).reshape(out, C)


def config_from_header(h: dict, name: str, source: str) -> ModelConfig:
    return ModelConfig(
        name=name,
        vocab_size=h["vocab_size"],
        block_size=h["seq_len"],
        n_layer=h["n_layers"],
        n_head=h["n_heads"],
        n_kv_head=h["n_kv_heads"],
        n_embd=h["dim"],
        intermediate_size=h["hidden_dim"],
        norm="rmsnorm",
        norm_eps=1e-5,
        mlp="swiglu",
        pos="rope",
        rope_base=10000.0,
        bias=False,
        tie_embeddings=h["shared"],
        extra={"imported_from": "llama2.c", "source_file": source},
    )


def read_llama2c_model(path: str | os.PathLike, verify: bool = True) -> Transformer:
    """Load a llama2.c legacy model file into an lmforge Llama Transformer (float32, eval mode).

    Raises CheckpointError naming the file when its size is not what the header implies (truncated, or bytes
    left over), when the header is not a llama2.c one, or (verify=True) when a file with a known name does
    not have the published sha256.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"llama2.c model file not found: {path}")
    data = path.read_bytes()
    h = read_header(path, data)
    shapes = tensor_shapes(h)
    expected = HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header implies"
        raise CheckpointError(
            f"{path} is {what}: the header (dim={h['dim']}, hidden_dim={h['hidden_dim']}, n_layers={h['n_layers']}, "
            f"n_heads={h['n_heads']}, n_kv_heads={h['n_kv_heads']}, vocab_size={h['vocab_size']}, "
            f"seq_len={h['seq_len']}) implies {expected} bytes, the file has {len(data)}; re-download or re-export it"
        )
    if verify and (problem := published_digest_mismatch(path, PUBLISHED_SHA256)):
        raise CheckpointError(problem)

    floats = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=HEADER.size).astype(np.float32))
    t, offset = {}, 0
    for key, shape in shapes:
        n = int(np.prod(shape))
        t[key] = floats[offset : offset + n].view(shape)
        offset += n

    config = config_from_header(h, path.stem, path.name)
    sd = {"tok_emb.weight": t["tok_emb"], "norm_f.weight": t["norm_f"]}
    if not h["shared"]:
        sd["lm_head.weight"] = t["classifier"]
    for i in range(config.n_layer):
        p = f"blocks.{i}."
        q = interleaved_to_half_split(t["wq"][i], config.n_head)
        k = interleaved_to_half_split(t["wk"][i], config.n_kv_head)
        sd[p + "attn.qkv.weight"] = torch.cat([q, k, t["wv"][i]])  # [q; k; v] rows
        sd[p + "attn.proj.weight"] = t["wo"][i]
        sd[p + "mlp.fc.weight"] = torch.cat([t["w1"][i], t["w3"][i]])  # [gate; up] rows
        sd[p + "mlp.proj.weight"] = t["w2"][i]
        sd[p + "norm1.weight"] = t["norm1"][i]
        sd[p + "norm2.weight"] = t["norm2"][i]
    model = Transformer(config)
    load_state(model, sd, path)  # every name and shape checked; copies into the model's own tensors
    return model.eval()
