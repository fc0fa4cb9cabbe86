"""`WordTokenizer`: whitespace words plus one `<eos>` per line, as PyTorch's `word_language_model` example."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmforge.tokenizer.base import EOS, UNK, TokenizerError, _check_ids, _save_own_format


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
