"""Tokenizers: text <-> integer ids, four kinds behind one small protocol.

- `CharTokenizer`: one id per Unicode character, vocabulary = the sorted set of characters of the corpus
  (nanoGPT's `shakespeare_char` recipe: tiny Shakespeare gives 65 symbols). No special tokens, so an unseen
  character is an error rather than a silent `<unk>`.
- `WordTokenizer`: whitespace words plus one `<eos>` per line, ids in order of first appearance -- exactly
  what PyTorch's `word_language_model` example (`data.py`, `Corpus.tokenize`) does for WikiText-2.
- `BPETokenizer`: byte-level BPE (GPT-2 style) trained and run by Hugging Face `tokenizers`, saved as a standard
  `tokenizer.json`; `BPETokenizer.from_file` also wraps any existing `tokenizer.json` (GPT-2, Llama, ...).
- `Llama2cTokenizer`: llama2.c's `tokenizer.bin` (SentencePiece-derived pieces with merge scores, byte fallback),
  encoding exactly as its `run.c` does; it comes with imported llama2.c models (lmforge.interop.llama2c).

Every tokenizer saves into a folder -- the model folder or a prepared data folder -- and `load_tokenizer`
reads back whichever kind is there. Char and word tokenizers write `lmforge_tokenizer.json`
(`{"kind": ..., "vocab": [...]}`); BPE writes `tokenizer.json`, llama2.c `llama2c_tokenizer.bin`. A folder holds
one tokenizer: saving one kind removes the other kinds' files, so `load_tokenizer` never has to guess.

Besides `encode`/`decode`, each tokenizer has `encode_batch(texts) -> list[np.ndarray]`, the fast path that
`lmforge.data.prepare` uses on corpora of tens of megabytes (numpy lookups for char, `encode_batch` in Rust
threads for BPE).

Each kind is its own module (`char`, `word`, `bpe`, `llama2c`); `base` holds what they share (file names, the
error, the protocol); this package's entry points train and load them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lmforge.fsutil import read_json
from lmforge.tokenizer.base import (
    BPE_EOS,
    HF_TOKENIZER_FILE,
    KINDS,
    LLAMA2C_TOKENIZER_FILE,
    LMFORGE_TOKENIZER_FILE,
    TOKENIZER_FILES,
    IncrementalDecoder,
    Tokenizer,
    TokenizerError,
)
from lmforge.tokenizer.bpe import BPETokenizer
from lmforge.tokenizer.char import CharTokenizer
from lmforge.tokenizer.llama2c import Llama2cTokenizer
from lmforge.tokenizer.word import WordTokenizer

__all__ = [
    "BPE_EOS",
    "KINDS",
    "TOKENIZER_FILES",
    "BPETokenizer",
    "CharTokenizer",
    "IncrementalDecoder",
    "Llama2cTokenizer",
    "Tokenizer",
    "TokenizerError",
    "WordTokenizer",
    "load_tokenizer",
    "train_tokenizer",
]

# ------------------------------------------------------------------------------------------ entry points


def train_tokenizer(kind: str, texts: Iterable[str], vocab_size: int | None = None) -> Tokenizer:
    """Train a tokenizer of `kind` ("char", "word" or "bpe") on `texts`.

    `vocab_size` caps the word vocabulary (None: keep every word) and sets the BPE size (None: 4096);
    a char vocabulary is whatever characters occur, so it takes no size.
    """
    if kind == "char":
        if vocab_size is not None:
            raise TokenizerError("a char tokenizer's vocabulary is the set of characters; leave vocab_size unset")
        return CharTokenizer.train(texts)
    if kind == "word":
        return WordTokenizer.train(texts, vocab_size)
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size)
    raise TokenizerError(f"unknown tokenizer kind {kind!r}; choose one of {', '.join(KINDS)}")


def load_tokenizer(path: str | os.PathLike, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer a folder holds (`lmforge_tokenizer.json`, `tokenizer.json` or `llama2c_tokenizer.bin`) or a
    tokenizer file (a `tokenizer.json`, or a llama2.c tokenizer .bin).

    `vocab_size` is the model's: a llama2.c file, which does not record its size, is read to that many tokens
    and refused when it holds another number.
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json":
            return BPETokenizer.from_file(path)
        return Llama2cTokenizer.from_file(path, vocab_size)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    if (path / LLAMA2C_TOKENIZER_FILE).is_file():
        return Llama2cTokenizer.from_file(path / LLAMA2C_TOKENIZER_FILE, vocab_size)
    own, hf = path / LMFORGE_TOKENIZER_FILE, path / HF_TOKENIZER_FILE
    if own.is_file() and hf.is_file():
        raise TokenizerError(f"{path} holds both {own.name} and {hf.name}; remove the one that is stale")
    if hf.is_file():
        return BPETokenizer.from_file(hf)
    if not own.is_file():
        raise TokenizerError(
            f"no tokenizer in {path}: expected {own.name} (char/word) or {hf.name} (BPE); `lmforge prepare` writes one"
        )
    fix = "re-run `lmforge prepare` to rewrite it"
    spec = read_json(own, "tokenizer file", TokenizerError, fix)
    kind, vocab = spec.get("kind"), spec.get("vocab")
    classes = {"char": CharTokenizer, "word": WordTokenizer}
    if kind not in classes:
        raise TokenizerError(f"{own} has unknown kind {kind!r}; expected 'char' or 'word'")
    try:
        return classes[kind](vocab)
    except (TokenizerError, TypeError) as e:
        raise TokenizerError(f"{own} is corrupt: {e}; {fix}") from e
