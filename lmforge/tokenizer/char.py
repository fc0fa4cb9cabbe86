"""`CharTokenizer`: one id per Unicode character (nanoGPT's `shakespeare_char` recipe)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmforge.tokenizer.base import TokenizerError, _check_ids, _save_own_format


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
