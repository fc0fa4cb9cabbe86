"""llama2.c checkpoints and tokenizers (github.com/karpathy/llama2.c, `run.c` and `export.py`).

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

Tokenizer file: int32 max_token_length, then per token in id order: float32 score, int32 length, raw bytes.
It does not store the vocabulary size (the model header has it). `Llama2cTokenizer` encodes exactly as
`run.c`'s `encode` does and decodes as its `decode` does.
"""

from __future__ import annotations

import hashlib
import heapq
import os
import re
import struct
from pathlib import Path
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from lmforge.checkpoint import CheckpointError, load_state
from lmforge.config import ModelConfig
from lmforge.fsutil import atomic_write_bytes
from lmforge.model import Transformer

TOKENIZER_FILE = "llama2c_tokenizer.bin"  # the tokenizer's name inside an lmforge model folder
HEADER = struct.Struct("<7i")
MAGIC = 0x616B3432  # "ak42": llama2.c's newer versioned exports, which this reader does not take
BOS_ID, EOS_ID = 1, 2
BYTE_OFFSET = 3  # byte-fallback token of byte b is id b + 3

# sha256 of published llama2.c files (name -> digest); a file with a known name must match, so a copy whose
# elements were shuffled or altered (same size, same header, wrong weights) is refused instead of run.
KNOWN_SHA256 = {
    # huggingface.co/karpathy/tinyllamas stories260K/ (see shared/models/stories260K/SOURCE.md)
    "stories260K.bin": "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
    "tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_known_file(path: Path) -> None:
    """Check a file whose name is in KNOWN_SHA256 against its published digest."""
    expected = KNOWN_SHA256.get(path.name)
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        raise CheckpointError(
            f"{path}: sha256 {actual} differs from the published {path.name} ({expected}); the file was altered "
            f"or its elements may have been shuffled (a same-size copy with the right header but wrong weights "
            f"runs and writes garbage). Use the original file, or pass verify=False to load it anyway")


# ---------------------------------------------------------------------------------------------- model


def read_header(path: Path, data: bytes) -> dict:
    """The 7 header ints, sanity-checked, as a dict (vocab_size made positive, `shared` from its sign)."""
    if len(data) < HEADER.size:
        raise CheckpointError(f"{path} is {len(data)} bytes, too short for the {HEADER.size}-byte llama2.c header")
    if struct.unpack_from("<I", data)[0] == MAGIC:
        raise CheckpointError(f"{path} is a versioned llama2.c export (magic 'ak42'); lmforge reads the legacy "
                              f"format (llama2.c export.py --version 0)")
    dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = HEADER.unpack_from(data)
    h = dict(dim=dim, hidden_dim=hidden, n_layers=n_layers, n_heads=n_heads, n_kv_heads=n_kv,
             vocab_size=abs(vocab), seq_len=seq_len, shared=vocab > 0)
    limit = 1 << 20
    bad = [f"{k}={v}" for k, v in h.items() if k != "shared" and not 0 < v <= limit]
    if bad or dim % n_heads or n_heads % n_kv or (dim // n_heads) % 2:
        raise CheckpointError(
            f"{path} does not start with a llama2.c header: read {', '.join(f'{k}={v}' for k, v in h.items())} "
            f"(each must be in 1..{limit}, dim divisible by n_heads, n_heads by n_kv_heads, head size even)"
            + (f"; out of range: {', '.join(bad)}" if bad else ""))
    return h


def tensor_shapes(h: dict) -> list[tuple[str, tuple[int, ...]]]:
    """The float32 tensors of the file, in file order (the RoPE tables included, as `rope`)."""
    C, H, L, V = h["dim"], h["hidden_dim"], h["n_layers"], h["vocab_size"]
    hs = C // h["n_heads"]
    kv = h["n_kv_heads"] * hs
    shapes = [("tok_emb", (V, C)), ("norm1", (L, C)), ("wq", (L, C, C)), ("wk", (L, kv, C)), ("wv", (L, kv, C)),
              ("wo", (L, C, C)), ("norm2", (L, C)), ("w1", (L, H, C)), ("w2", (L, C, H)), ("w3", (L, H, C)),
              ("norm_f", (C,)), ("rope", (2, h["seq_len"] * hs // 2))]
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
        name=name, vocab_size=h["vocab_size"], block_size=h["seq_len"], n_layer=h["n_layers"], n_head=h["n_heads"],
        n_kv_head=h["n_kv_heads"], n_embd=h["dim"], intermediate_size=h["hidden_dim"], norm="rmsnorm",
        norm_eps=1e-5, mlp="swiglu", pos="rope", rope_base=10000.0, bias=False, tie_embeddings=h["shared"],
        extra={"imported_from": "llama2.c", "source_file": source})


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
            f"seq_len={h['seq_len']}) implies {expected} bytes, the file has {len(data)}; re-download or re-export it")
    if verify:
        verify_known_file(path)

    floats = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=HEADER.size).astype(np.float32))
    t, offset = {}, 0
    for key, shape in shapes:
        n = int(np.prod(shape))
        t[key] = floats[offset:offset + n].view(shape)
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


# ------------------------------------------------------------------------------------------ tokenizer


class Llama2cTokenizer:
    """llama2.c's SentencePiece-derived BPE: pieces (bytes) with merge scores, byte fallback, BOS=1, EOS=2.

    Unlike lmforge's other tokenizers, `encode` adds BOS by default, because llama2.c's does and the model was
    trained with it (pass bos=False for a bare continuation). `decode` drops BOS and EOS (control tokens, not
    text) and, as llama2.c does, the leading space of the piece right after BOS.
    """

    kind = "llama2c"
    bos_id, eos_id = BOS_ID, EOS_ID

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], max_token_length: int):
        if len(pieces) != len(scores) or len(pieces) < BYTE_OFFSET + 256:
            raise ValueError(f"a llama2.c vocabulary needs <unk>, BOS, EOS and 256 byte tokens and one score per "
                             f"piece; got {len(pieces)} pieces and {len(scores)} scores")
        self.pieces = [bytes(p) for p in pieces]
        self.scores = [float(np.float32(s)) for s in scores]
        self.max_token_length = int(max_token_length)
        self.vocab_size = len(self.pieces)
        # run.c looks strings up by binary search in the sorted vocabulary; pieces are distinct in practice,
        # and for a duplicate the first id wins here.
        self.lookup: dict[bytes, int] = {}
        for i, p in enumerate(self.pieces):
            self.lookup.setdefault(p, i)
        self.space_id = self.lookup.get(b" ")

    # -- files
    @classmethod
    def from_file(cls, path: str | os.PathLike, vocab_size: int | None = None,
                  verify: bool = True) -> "Llama2cTokenizer":
        """Read a llama2.c tokenizer.bin; `vocab_size` (the model's) is checked, or taken from the file's length."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"llama2.c tokenizer file not found: {path}")
        data = path.read_bytes()
        if verify:
            verify_known_file(path)
        pieces, scores, offset = [], [], 4
        if len(data) < 4:
            raise CheckpointError(f"{path} is {len(data)} bytes: too short for a llama2.c tokenizer")
        max_len = struct.unpack_from("<i", data)[0]
        while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if offset + 8 > len(data):
                break
            score, n = struct.unpack_from("<fi", data, offset)
            if not 0 <= n <= max(max_len, 64) or offset + 8 + n > len(data):
                break
            scores.append(score)
            pieces.append(data[offset + 8:offset + 8 + n])
            offset += 8 + n
        if offset != len(data) or (vocab_size is not None and len(pieces) != vocab_size):
            want = f"{vocab_size} tokens (the model's vocab_size)" if vocab_size else "whole token records"
            raise CheckpointError(f"{path} does not hold {want}: read {len(pieces)} tokens ending at byte "
                                  f"{offset} of {len(data)}; is it the tokenizer that belongs to this model?")
        return cls(pieces, scores, max_len)

    def to_bytes(self) -> bytes:
        out = [struct.pack("<i", self.max_token_length)]
        for p, s in zip(self.pieces, self.scores):
            out.append(struct.pack("<fi", s, len(p)) + p)
        return b"".join(out)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `llama2c_tokenizer.bin` (the llama2.c format, byte for byte) into folder."""
        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        atomic_write_bytes(path, self.to_bytes())
        for stale in ("tokenizer.json", "lmforge_tokenizer.json"):  # a folder holds one tokenizer
            (folder / stale).unlink(missing_ok=True)
        return path

    # -- encode
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids as run.c's encode(): [BOS], dummy-prefix " " when text is non-empty, code points, then merges."""
        tokens = [BOS_ID] if bos else []
        if text:
            if self.space_id is None:
                raise ValueError("this llama2.c vocabulary has no ' ' piece for the dummy prefix")
            tokens.append(self.space_id)
        for ch in text:  # one UTF-8 code point at a time: its piece, else its bytes as byte tokens
            b = ch.encode("utf-8")
            i = self.lookup.get(b)
            tokens.extend([i] if i is not None else [byte + BYTE_OFFSET for byte in b])
        tokens = self.merge(tokens)
        return tokens + [EOS_ID] if eos else tokens

    def merge(self, tokens: list[int]) -> list[int]:
        """run.c's merge loop: while some adjacent pair's concatenation is a piece, merge the pair whose piece
        scores highest (the leftmost on ties; scores must beat -1e10). A heap with stale-entry checks gives the
        same choices as rescanning every pair each round, in O(n log n) instead of O(n^2)."""
        n = len(tokens)
        if n < 2:
            return list(tokens)
        tok = list(tokens)
        nxt = list(range(1, n)) + [-1]
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j < 0:
                return
            m = self.lookup.get(self.pieces[tok[i]] + self.pieces[tok[j]])
            if m is not None and self.scores[m] > -1e10:
                heapq.heappush(heap, (-self.scores[m], i, m, tok[i], tok[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, m, ti, tj = heapq.heappop(heap)
            j = nxt[i]
            if not alive[i] or j < 0 or tok[i] != ti or tok[j] != tj:
                continue  # stale: the pair changed since it was pushed
            tok[i] = m
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] >= 0:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [tok[i] for i in range(n) if alive[i]]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.array(self.encode(t), dtype=np.int64) for t in texts]

    # -- decode
    _BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")

    def piece_bytes(self, prev: int, token: int) -> bytes:
        """run.c's decode(prev, token): strip a leading space after BOS; `<0xHH>` is the raw byte HH."""
        piece = self.pieces[token]
        if prev == BOS_ID and piece.startswith(b" "):
            piece = piece[1:]
        m = self._BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: bytes of every piece but BOS/EOS joined, then UTF-8 decoded (invalid bytes -> U+FFFD)."""
        out, prev = [], -1
        for token in ids:
            token = int(token)
            if not 0 <= token < self.vocab_size:
                raise ValueError(f"token id {token} is outside the vocabulary (0..{self.vocab_size - 1})")
            if token not in (BOS_ID, EOS_ID):
                out.append(self.piece_bytes(prev, token))
            prev = token
        return b"".join(out).decode("utf-8", errors="replace")
