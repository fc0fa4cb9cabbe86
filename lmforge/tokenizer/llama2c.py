"""`Llama2cTokenizer`: llama2.c's `tokenizer.bin`, encoding exactly as its `run.c` does."""

from __future__ import annotations

import heapq
import os
import re
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmforge.fsutil import atomic_write_bytes, published_digest_mismatch
from lmforge.tokenizer.base import (
    HF_TOKENIZER_FILE,
    LLAMA2C_TOKENIZER_FILE,
    LMFORGE_TOKENIZER_FILE,
    TokenizerError,
    _check_ids,
)

# llama2.c's tokenizer.bin: int32 max_token_length, then per token in id order: float32 score, int32 length, raw
# bytes. It does not store the vocabulary size (the model header has it).
LLAMA2C_BOS_ID, LLAMA2C_EOS_ID = 1, 2
LLAMA2C_BYTE_OFFSET = 3  # byte-fallback token of byte b is id b + 3
# sha256 of published tokenizer files (huggingface.co/karpathy/tinyllamas stories260K/, see
# shared/models/stories260K/SOURCE.md): a file with a known name must match.
LLAMA2C_PUBLISHED_SHA256 = {"tok512.bin": "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312"}


class Llama2cTokenizer:
    """llama2.c's SentencePiece-derived BPE: pieces (bytes) with merge scores, byte fallback, BOS=1, EOS=2.

    Unlike lmforge's other tokenizers, `encode` adds BOS by default, because llama2.c's does and the model was
    trained with it (pass bos=False for a bare continuation). `decode` drops BOS and EOS (control tokens, not
    text) and, as llama2.c does, the leading space of the piece right after BOS.
    """

    kind = "llama2c"
    bos_id, eos_id = LLAMA2C_BOS_ID, LLAMA2C_EOS_ID
    # The ids that end a generated text: llama2.c's training data starts every story with BOS and holds no EOS,
    # so run.c stops when the model samples BOS (the start of another story); EOS would end one too.
    end_ids = (LLAMA2C_BOS_ID, LLAMA2C_EOS_ID)

    def __init__(self, pieces: Sequence[bytes], scores: Sequence[float], max_token_length: int):
        if len(pieces) != len(scores) or len(pieces) < LLAMA2C_BYTE_OFFSET + 256:
            raise TokenizerError(
                f"a llama2.c vocabulary needs <unk>, BOS, EOS and 256 byte tokens and one score per "
                f"piece; got {len(pieces)} pieces and {len(scores)} scores"
            )
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
    def from_file(cls, path: str | os.PathLike, vocab_size: int | None = None, verify: bool = True) -> Llama2cTokenizer:
        """Read a llama2.c tokenizer.bin; `vocab_size` (the model's) is checked, or taken from the file's length."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"llama2.c tokenizer file not found: {path}")
        data = path.read_bytes()
        if verify and (problem := published_digest_mismatch(path, LLAMA2C_PUBLISHED_SHA256)):
            raise TokenizerError(problem)
        pieces, scores, offset = [], [], 4
        if len(data) < 4:
            raise TokenizerError(f"{path} is {len(data)} bytes: too short for a llama2.c tokenizer")
        max_len = struct.unpack_from("<i", data)[0]
        while offset < len(data) and (vocab_size is None or len(pieces) < vocab_size):
            if offset + 8 > len(data):
                break
            score, n = struct.unpack_from("<fi", data, offset)
            if not 0 <= n <= max(max_len, 64) or offset + 8 + n > len(data):
                break
            scores.append(score)
            pieces.append(data[offset + 8 : offset + 8 + n])
            offset += 8 + n
        if offset != len(data) or (vocab_size is not None and len(pieces) != vocab_size):
            want = f"{vocab_size} tokens (the model's vocab_size)" if vocab_size else "whole token records"
            raise TokenizerError(
                f"{path} does not hold {want}: read {len(pieces)} tokens ending at byte "
                f"{offset} of {len(data)}; is it the tokenizer that belongs to this model?"
            )
        return cls(pieces, scores, max_len)

    def to_bytes(self) -> bytes:
        out = [struct.pack("<i", self.max_token_length)]
        for p, s in zip(self.pieces, self.scores):
            out.append(struct.pack("<fi", s, len(p)) + p)
        return b"".join(out)

    def save(self, folder: str | os.PathLike) -> Path:
        """Write `llama2c_tokenizer.bin` (the llama2.c format, byte for byte) into folder."""
        folder = Path(folder)
        path = folder / LLAMA2C_TOKENIZER_FILE
        atomic_write_bytes(path, self.to_bytes())
        for stale in (HF_TOKENIZER_FILE, LMFORGE_TOKENIZER_FILE):  # a folder holds one tokenizer
            (folder / stale).unlink(missing_ok=True)
        return path

    # -- encode
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Ids as run.c's encode(): [BOS], dummy-prefix " " when text is non-empty, code points, then merges."""
        tokens = [LLAMA2C_BOS_ID] if bos else []
        if text:
            if self.space_id is None:
                raise TokenizerError("this llama2.c vocabulary has no ' ' piece for the dummy prefix")
            tokens.append(self.space_id)
        for ch in text:  # one UTF-8 code point at a time: its piece, else its bytes as byte tokens
            b = ch.encode("utf-8")
            i = self.lookup.get(b)
            tokens.extend([i] if i is not None else [byte + LLAMA2C_BYTE_OFFSET for byte in b])
        tokens = self.merge(tokens)
        return tokens + [LLAMA2C_EOS_ID] if eos else tokens

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
        if prev == LLAMA2C_BOS_ID and piece.startswith(b" "):
            piece = piece[1:]
        m = self._BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids: bytes of every piece but BOS/EOS joined, then UTF-8 decoded (invalid bytes -> U+FFFD)."""
        out, prev = [], -1
        for token in _check_ids(ids, self.vocab_size):
            if token not in (LLAMA2C_BOS_ID, LLAMA2C_EOS_ID):
                out.append(self.piece_bytes(prev, token))
            prev = token
        return b"".join(out).decode("utf-8", errors="replace")
