"""Tokenizers: text <-> integer ids, three kinds behind one small protocol.

- `CharTokenizer`: one id per Unicode character, vocabulary = the sorted set of characters of the corpus
  (nanoGPT's `shakespeare_char` recipe: tiny Shakespeare gives 65 symbols). No special tokens, so an unseen
  character is an error rather than a silent `<unk>`.
- `WordTokenizer`: whitespace words plus one `<eos>` per line, ids in order of first appearance -- exactly
  what PyTorch's `word_language_model` example (`data.py`, `Corpus.tokenize`) does for WikiText-2.
- `BPETokenizer`: byte-level BPE (GPT-2 style) trained and run by Hugging Face `tokenizers`, saved as a standard
  `tokenizer.json`; `BPETokenizer.from_file` also wraps any existing `tokenizer.json` (GPT-2, Llama, ...).

Every tokenizer saves into a folder -- the model folder or a prepared data folder -- and `load_tokenizer`
reads back whichever kind is there. Char and word tokenizers write `lmforge_tokenizer.json`
(`{"kind": ..., "vocab": [...]}`); BPE writes `tokenizer.json`. A folder holds one tokenizer: saving one kind
removes the other kind's file, so `load_tokenizer` never has to guess.

Besides `encode`/`decode`, each tokenizer has `encode_batch(texts) -> list[np.ndarray]`, the fast path that
`lmforge.data.prepare` uses on corpora of tens of megabytes (numpy lookups for char, `encode_batch` in Rust
threads for BPE).
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Protocol, Sequence, runtime_checkable

import numpy as np

from lmforge.fsutil import atomic_write_text
from lmforge.errors import LmforgeError

LMFORGE_TOKENIZER_FILE = "lmforge_tokenizer.json"  # char and word tokenizers
HF_TOKENIZER_FILE = "tokenizer.json"  # byte-level BPE, and any imported Hugging Face tokenizer
LLAMA2C_TOKENIZER_FILE = "llama2c_tokenizer.bin"  # an imported llama2.c tokenizer (lmforge.interop.llama2c)
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


# ---------------------------------------------------------------------------------------------- char


class CharTokenizer:
    """One id per character; id order = sorted characters, as nanoGPT's `prepare.py` builds `stoi`."""

    kind = "char"
    eos_id = None
    bos_id = None

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if any(len(ch) != 1 for ch in vocab) or len(set(vocab)) != len(vocab) or vocab != sorted(vocab):
            raise TokenizerError("a char vocabulary must be a sorted list of distinct single characters")
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.stoi = {ch: i for i, ch in enumerate(vocab)}
        # Sorted code points make encoding a vectorised `searchsorted` instead of a Python loop.
        self._codepoints = np.array([ord(ch) for ch in vocab], dtype=np.int64)

    @classmethod
    def train(cls, texts: Iterable[str]) -> "CharTokenizer":
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        return cls(sorted(chars))

    def encode_array(self, text: str) -> np.ndarray:
        """Ids as an int64 array; raises `TokenizerError` naming the first character not in the vocabulary."""
        points = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4").astype(np.int64)
        if len(self._codepoints) == 0:
            idx = np.zeros(len(points), dtype=np.int64)
            known = np.zeros(len(points), dtype=bool)
        else:
            idx = np.searchsorted(self._codepoints, points).clip(max=len(self._codepoints) - 1)
            known = self._codepoints[idx] == points
        if not known.all():
            pos = int(np.argmin(known))
            ch = text[pos]
            raise TokenizerError(
                f"character {ch!r} (U+{ord(ch):04X}) at position {pos} is not in the char vocabulary "
                f"of {self.vocab_size} symbols; train the tokenizer on text that contains it"
            )
        return idx

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode_array(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in _check_ids(ids, self.vocab_size))

    def save(self, folder: str | os.PathLike) -> Path:
        return _save_own_format(folder, self.kind, self.vocab)


# ---------------------------------------------------------------------------------------------- word


def _lines(text: str) -> list[str]:
    """The lines a text-mode `for line in f` would give: universal newlines, no empty tail after a final newline."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _words(text: str) -> Iterable[str]:
    """`line.split() + ['<eos>']` for every line: PyTorch's `Corpus.tokenize`."""
    for line in _lines(text):
        yield from line.split()
        yield EOS


class WordTokenizer:
    """Whitespace words + `<eos>` per line; unknown words map to `<unk>`."""

    kind = "word"
    bos_id = None

    def __init__(self, vocab: Sequence[str]):
        vocab = list(vocab)
        if len(set(vocab)) != len(vocab) or EOS not in vocab or UNK not in vocab:
            raise TokenizerError(f"a word vocabulary must hold distinct words including {EOS!r} and {UNK!r}")
        self.vocab = vocab
        self.vocab_size = len(vocab)
        self.stoi = {w: i for i, w in enumerate(vocab)}
        self.eos_id = self.stoi[EOS]
        self.unk_id = self.stoi[UNK]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "WordTokenizer":
        """Ids in order of first appearance; with `vocab_size`, keep the most frequent words (ties: first seen).

        `<eos>` and `<unk>` always stay in (and count towards `vocab_size`); `<unk>` is appended when the
        corpus never uses it.
        """
        counts: Counter[str] = Counter()  # a dict, so it remembers first appearance
        for text in texts:
            counts.update(_words(text))
        words = list(counts)
        if vocab_size is not None:
            if vocab_size < 2:
                raise TokenizerError(f"word vocab_size={vocab_size} is too small: it must hold {EOS} and {UNK}")
            reserved = {EOS, UNK}
            budget = vocab_size - len(reserved)
            by_count = sorted((w for w in words if w not in reserved), key=lambda w: -counts[w])  # stable
            keep = reserved | set(by_count[:budget])
            words = [w for w in words if w in keep]
        if EOS not in words:
            words.append(EOS)
        if UNK not in words:
            words.append(UNK)
        return cls(words)

    def encode(self, text: str) -> list[int]:
        get, unk = self.stoi.get, self.unk_id
        return [get(w, unk) for w in _words(text)]

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.array(self.encode(t), dtype=np.int64) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Words joined by spaces; `<eos>` ends the line."""
        out: list[str] = []
        line_start = True
        for i in _check_ids(ids, self.vocab_size):
            if i == self.eos_id:
                out.append("\n")
                line_start = True
            else:
                out.append(self.vocab[i] if line_start else " " + self.vocab[i])
                line_start = False
        return "".join(out)

    def save(self, folder: str | os.PathLike) -> Path:
        return _save_own_format(folder, self.kind, self.vocab)


# ----------------------------------------------------------------------------------------------- bpe


def _special_token_id(tok, configured: str | None, candidates: Sequence[str]) -> int | None:
    """The id of `configured` if given, else of the first candidate that is an added (special) token."""
    if configured is not None:
        return tok.token_to_id(configured)
    added = {t.content: i for i, t in tok.get_added_tokens_decoder().items()}
    for name in candidates:
        if name in added:
            return added[name]
    return None


def _configured_token(config: dict, key: str) -> str | None:
    """`tokenizer_config.json` spells a special token as a string or as `{"content": ...}`."""
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class BPETokenizer:
    """A Hugging Face `tokenizers.Tokenizer`: trained byte-level BPE, or any imported `tokenizer.json`."""

    kind = "bpe"

    def __init__(self, tok, eos_token: str | None = None, bos_token: str | None = None):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _special_token_id(tok, eos_token, EOS_CANDIDATES)
        self.bos_id = _special_token_id(tok, bos_token, BOS_CANDIDATES)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> "BPETokenizer":
        """GPT-2 style: bytes mapped to 256 printable symbols, so any UTF-8 text encodes with no `<unk>`."""
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

        vocab_size = DEFAULT_BPE_VOCAB_SIZE if vocab_size is None else vocab_size
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if vocab_size < len(alphabet) + 1:
            raise TokenizerError(
                f"bpe vocab_size={vocab_size} is too small: byte-level BPE needs {len(alphabet)} byte symbols "
                f"plus {BPE_EOS}, so at least {len(alphabet) + 1}"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[BPE_EOS],
            initial_alphabet=alphabet,
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok, eos_token=BPE_EOS)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "BPETokenizer":
        """Wrap an existing `tokenizer.json`.

        eos/bos come from a `tokenizer_config.json` beside it when that names them (as Hugging Face model
        folders do), else from the added tokens by their usual spellings (`<|endoftext|>`, `</s>`, `<s>`, ...).
        """
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"tokenizer file {path} does not exist")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON or an unknown model
            raise TokenizerError(f"{path} is not a valid Hugging Face tokenizer.json ({e})") from e
        config_path = path.parent / "tokenizer_config.json"
        config: dict = {}
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{config_path} is not valid JSON ({e}); fix or remove it") from e
        return cls(tok, _configured_token(config, "eos_token"), _configured_token(config, "bos_token"))

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes in parallel Rust threads; `encode_batch_fast` skips the offsets nobody here needs."""
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [np.array(e.ids, dtype=np.int64) for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens: a text containing "<|endoftext|>" must come back unchanged.
        return self.tok.decode(_check_ids(ids, self.vocab_size), skip_special_tokens=False)

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        path = folder / HF_TOKENIZER_FILE
        atomic_write_text(path, self.tok.to_str())
        for stale in (LMFORGE_TOKENIZER_FILE, LLAMA2C_TOKENIZER_FILE):
            (folder / stale).unlink(missing_ok=True)
        return path


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


def load_tokenizer(folder: str | os.PathLike) -> Tokenizer:
    """Load the tokenizer saved in `folder`: `lmforge_tokenizer.json` (char/word) or `tokenizer.json` (BPE)."""
    folder = Path(folder)
    if (folder / LLAMA2C_TOKENIZER_FILE).is_file():
        from lmforge.interop.llama2c import Llama2cTokenizer

        return Llama2cTokenizer.from_file(folder / LLAMA2C_TOKENIZER_FILE)
    own, hf = folder / LMFORGE_TOKENIZER_FILE, folder / HF_TOKENIZER_FILE
    if own.is_file() and hf.is_file():
        raise TokenizerError(f"{folder} holds both {own.name} and {hf.name}; remove the one that is stale")
    if hf.is_file():
        return BPETokenizer.from_file(hf)
    if not own.is_file():
        raise TokenizerError(
            f"no tokenizer in {folder}: expected {own.name} (char/word) or {hf.name} (BPE); "
            "`lmforge prepare` writes one"
        )
    try:
        spec = json.loads(own.read_text(encoding="utf-8"))
        kind, vocab = spec["kind"], spec["vocab"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise TokenizerError(f"{own} is corrupt ({e!r}); re-run `lmforge prepare` to rewrite it") from e
    classes = {"char": CharTokenizer, "word": WordTokenizer}
    if kind not in classes:
        raise TokenizerError(f"{own} has unknown kind {kind!r}; expected 'char' or 'word'")
    try:
        return classes[kind](vocab)
    except TokenizerError as e:
        raise TokenizerError(f"{own} is corrupt: {e}; re-run `lmforge prepare` to rewrite it") from e
