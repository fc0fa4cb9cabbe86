"""What every tokenizer shares: the folder's file names, the special tokens imported files spell, the error, the
protocol the rest of lmforge relies on, and the id check."""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_write_text

LMFORGE_TOKENIZER_FILE = "lmforge_tokenizer.json"  # char and word tokenizers
HF_TOKENIZER_FILE = "tokenizer.json"  # byte-level BPE, and any imported Hugging Face tokenizer
LLAMA2C_TOKENIZER_FILE = "llama2c_tokenizer.bin"  # an imported llama2.c tokenizer
TOKENIZER_FILES = (LMFORGE_TOKENIZER_FILE, HF_TOKENIZER_FILE, LLAMA2C_TOKENIZER_FILE)  # what a model folder may carry
KINDS = ("char", "word", "bpe")
DEFAULT_BPE_VOCAB_SIZE = 4096  # small enough to train in seconds on a few MB, big enough to beat chars
EOS, UNK = "<eos>", "<unk>"  # the word tokenizer's two special words (WikiText-2 spelling)
BPE_EOS = "<|endoftext|>"  # GPT-2's document separator, the one special token of a trained BPE
# How imported tokenizer.json files spell their special tokens, most common first.
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>", "[SEP]")
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


class TokenizerError(LmforgeError):
    """Bad tokenizer input: an unknown character, an unreadable tokenizer file, a vocabulary size out of range."""


@runtime_checkable
class Tokenizer(Protocol):
    """What the rest of lmforge relies on. `encode` adds no special tokens: callers add `bos_id`/`eos_id`."""

    kind: str
    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def save(self, folder: str | os.PathLike) -> Path: ...


def _check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise TokenizerError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def _save_own_format(folder: str | os.PathLike, kind: str, vocab: list[str]) -> Path:
    """Write `lmforge_tokenizer.json` and drop a stale `tokenizer.json`, so the folder holds one tokenizer."""
    folder = Path(folder)
    path = folder / LMFORGE_TOKENIZER_FILE
    atomic_write_text(path, json.dumps({"kind": kind, "vocab": vocab}, ensure_ascii=False))
    for stale in (HF_TOKENIZER_FILE, LLAMA2C_TOKENIZER_FILE):
        (folder / stale).unlink(missing_ok=True)
    return path


class IncrementalDecoder:
    """One output's text, decoded a few tokens at a time instead of whole after every token.

    `push(ids)` appends token ids and returns the whole text so far, equal to `tokenizer.decode(all ids)`: each
    call decodes only a window from `prefix` (the start of the last piece already read, so a tokenizer that
    treats a window's first token specially, e.g. SentencePiece's leading space, treats it the same in both
    decodes) and adds what the window decodes to beyond what its read part decoded to. A window ending inside a
    multi-byte character (U+FFFD) waits for the next token; `final=True` flushes it as the whole decode would.
    (vLLM's detokenize_incrementally, with prefix and read offsets.)
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""
        self.prefix = self.read = 0  # the window starts at prefix; ids before read are in self.text
        # A tokenizer whose decode is its tokens' bytes read as UTF-8 (BPETokenizer.utf8_pieces) is read a token at
        # a time: its bytes into an incremental UTF-8 decoder that holds an unfinished character back (a served
        # token cost 44 us in two decodes, a few here).
        self.pieces = getattr(tokenizer, "utf8_pieces", None)
        self.utf8 = codecs.getincrementaldecoder("utf-8")("replace") if self.pieces is not None else None

    def push(self, ids: Iterable[int], final: bool = False) -> str:
        if self.utf8 is not None:
            new = list(ids)
            if any(i < 0 for i in new):
                self.tokenizer.decode(new)  # its error, the same as the whole decode's
            self.ids += new
            n = len(self.pieces)
            self.text += self.utf8.decode(b"".join(self.pieces[i] for i in new if i < n), final)
            return self.text
        self.ids += ids
        if self.read < len(self.ids):
            known = self.tokenizer.decode(self.ids[self.prefix : self.read])
            window = self.tokenizer.decode(self.ids[self.prefix :])
            if final or (len(window) > len(known) and not window.endswith("\ufffd")):
                self.text += window[len(known) :]
                self.prefix, self.read = self.read, len(self.ids)
        return self.text
