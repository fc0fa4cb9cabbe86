"""`BPETokenizer`: byte-level BPE trained and run by Hugging Face `tokenizers`, or any `tokenizer.json`."""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from lmforge.fsutil import atomic_write_text, read_json
from lmforge.tokenizer.base import (
    BOS_CANDIDATES,
    BPE_EOS,
    DEFAULT_BPE_VOCAB_SIZE,
    EOS_CANDIDATES,
    HF_TOKENIZER_FILE,
    LLAMA2C_TOKENIZER_FILE,
    LMFORGE_TOKENIZER_FILE,
    TokenizerError,
    _check_ids,
)


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


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable symbol for each byte, inverted (the table byte-level BPE vocabularies are written in)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = list(bs), 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


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

    @functools.cached_property
    def utf8_pieces(self) -> list[bytes] | None:
        """Each id's bytes in the text, where a decode is exactly their concatenation read as UTF-8 (errors
        replaced): a tokenizer whose only decoder is ByteLevel (GPT-2, Llama 3, Qwen, lmforge's own), added tokens
        spelled as they are. lmforge.tokenizer.IncrementalDecoder then reads a token at a time instead of
        decoding twice a token. None for any other decoder (Metaspace's dropped leading space, word joins)."""
        from tokenizers import decoders

        if not isinstance(self.tok.decoder, decoders.ByteLevel):  # (a Sequence holding one is not just its bytes)
            return None
        table = gpt2_byte_decoder()
        pieces = [b""] * self.vocab_size
        for token, i in self.tok.get_vocab(with_added_tokens=False).items():
            if not all(ch in table for ch in token):
                return None
            pieces[i] = bytes(table[ch] for ch in token)
        for i, added in self.tok.get_added_tokens_decoder().items():
            pieces[i] = added.content.encode("utf-8")
        return pieces

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
