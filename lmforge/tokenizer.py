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
"""

from __future__ import annotations

import heapq
import json
import os
import re
import struct
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from lmforge.errors import LmforgeError
from lmforge.fsutil import atomic_write_bytes, atomic_write_text, published_digest_mismatch, read_json

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
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
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
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> WordTokenizer:
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


def _generation_eos_ids(path: Path) -> list[int]:
    """generation_config.json's eos_token_id (an id or a list of them); [] when the file is absent."""
    if not path.is_file():
        return []
    ids = read_json(path, "generation config", TokenizerError, "fix or remove it").get("eos_token_id")
    ids = [ids] if isinstance(ids, int) else ids if isinstance(ids, list) else []
    return [i for i in ids if isinstance(i, int)]


class BPETokenizer:
    """A Hugging Face `tokenizers.Tokenizer`: trained byte-level BPE, or any imported `tokenizer.json`."""

    kind = "bpe"

    def __init__(
        self, tok, eos_token: str | None = None, bos_token: str | None = None, more_eos_ids: Sequence[int] = ()
    ):
        self.tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = _special_token_id(tok, eos_token, EOS_CANDIDATES)
        self.bos_id = _special_token_id(tok, bos_token, BOS_CANDIDATES)
        # More tokens that end a turn: those generation_config.json lists (lmforge.infer.generate.end_tokens)
        self.end_ids = tuple(dict.fromkeys(i for i in more_eos_ids if i >= 0 and i != self.eos_id))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int | None = None) -> BPETokenizer:
        """GPT-2 style: bytes mapped to 256 printable symbols, so any UTF-8 text encodes with no `<unk>`."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

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
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """Wrap an existing `tokenizer.json`.

        eos/bos come from a `tokenizer_config.json` beside it when that names them (as Hugging Face model
        folders do), else from the added tokens by their usual spellings (`<|endoftext|>`, `</s>`, `<s>`, ...).
        A `generation_config.json` beside it may list more tokens that end a turn (its eos_token_id): `end_ids`.
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
        config = (
            read_json(config_path, "tokenizer config", TokenizerError, "fix or remove it")
            if config_path.is_file()
            else {}
        )
        return cls(
            tok,
            _configured_token(config, "eos_token"),
            _configured_token(config, "bos_token"),
            _generation_eos_ids(path.parent / "generation_config.json"),
        )

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encodes in parallel Rust threads; `encode_batch_fast` skips the offsets nobody here needs."""
        encode = getattr(self.tok, "encode_batch_fast", self.tok.encode_batch)
        return [np.array(e.ids, dtype=np.int64) for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        # Keep special tokens: a text containing "<|endoftext|>" must come back unchanged. Ids past the tokenizer's
        # vocabulary (a model's padded embedding rows: Qwen2.5 has 151936 for 151665 tokens) decode to nothing, as
        # in transformers; a negative id is an error.
        ids = [int(i) for i in ids]
        return self.tok.decode(
            _check_ids([i for i in ids if i < self.vocab_size or i < 0], self.vocab_size), skip_special_tokens=False
        )

    def save(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        path = folder / HF_TOKENIZER_FILE
        atomic_write_text(path, self.tok.to_str())
        for stale in (LMFORGE_TOKENIZER_FILE, LLAMA2C_TOKENIZER_FILE):
            (folder / stale).unlink(missing_ok=True)
        return path


# ------------------------------------------------------------------------------------------- llama2.c

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
