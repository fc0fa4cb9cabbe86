"""A GGUF file's embedded tokenizer and chat template -> lmforge's tokenizer and the files a model keeps.

The inverse of lmforge.interop.gguf's add_bpe_tokenizer / add_llama2c_tokenizer, and what llama.cpp's tokenizer
reads (llama-vocab.cpp), by `tokenizer.ggml.model`:

- "gpt2" (byte-level BPE): a Hugging Face `tokenizers` Tokenizer built as a tokenizer.json document: the tokens in
  id order as the BPE vocabulary, `tokenizer.ggml.merges`, control (type 3) and user-defined (type 4) tokens as
  added tokens (special / not), and the pre-tokenizer `tokenizer.ggml.pre` names: "gpt-2" is GPT-2's ByteLevel
  regex, "llama-bpe" Llama 3's split (with ignore_merges, as llama.cpp sets for it), "qwen2" Qwen2's. BOS and EOS
  by id; lmforge's BPE encode adds no special tokens (a chat template writes BOS where the model wants it).
- "llama" (SentencePiece-style BPE with scores): lmforge's Llama2cTokenizer, which runs the same algorithm
  (a " " dummy prefix, code points, byte fallback to <0xHH> pieces, the highest-scoring merge first) with U+2581
  pieces turned back into spaces. It fixes unk 0, BOS 1, EOS 2 and the 256 byte pieces at 3..258 (Llama 2's
  layout, which llama2.c's files and llama.cpp's convert-llama2c-to-ggml share), and always adds BOS; a file laid
  out otherwise (Gemma's) is refused, naming the key.
- "none" (or no tokenizer.ggml.model): no tokenizer; the model runs on token ids.

Unused padding tokens ("[PAD{i}]", type 5) at the end of the list are dropped: they only fill the embedding rows.
`tokenizer.chat_template` becomes chat_template.jinja and the end-of-turn ids (eos, eot, eom) a
generation_config.json, the files an lmforge model folder keeps for them (lmforge.templates, lmforge.loader).
"""

from __future__ import annotations

import json

from lmforge.errors import LmforgeError
from lmforge.interop.gguf import LLAMA3_SPLIT, QWEN2_SPLIT, SPIECE_SPACE
from lmforge.templates import JINJA_FILE
from lmforge.tokenizer import Tokenizer

CONTROL, USER_DEFINED, UNUSED = 3, 4, 5  # gguf.TokenType values
LLAMA_BYTES = 3  # the first of the 256 byte pieces in a Llama-2-layout vocabulary
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def _split(regex: str) -> dict:
    return {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False},
            dict(BYTE_LEVEL, use_regex=False),
        ],
    }


# tokenizer.ggml.pre -> (tokenizer.json pre_tokenizer, ignore_merges)
PRE_TOKENIZERS = {
    "gpt-2": (BYTE_LEVEL, False),
    "llama-bpe": (_split(LLAMA3_SPLIT), True),
    "qwen2": (_split(QWEN2_SPLIT), False),
}


class GGUFTokenizerError(LmforgeError):
    """An embedded tokenizer lmforge cannot reproduce; the message names the metadata key and its value."""


def _tokens(meta, vocab_size: int) -> tuple[list[str], list[int]]:
    tokens = list(meta.get("tokenizer.ggml.tokens") or [])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    while tokens and types[-1] == UNUSED:
        tokens.pop(), types.pop()
    if len(tokens) > vocab_size:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.tokens holds {len(tokens)} tokens but token_embd only {vocab_size} rows",
            param="tokenizer.ggml.tokens",
        )
    return tokens, types


def bpe_tokenizer(meta, vocab_size: int):
    """tokenizer.ggml.model "gpt2" -> lmforge's BPETokenizer (a `tokenizers` Tokenizer)."""
    from tokenizers import Tokenizer

    from lmforge.tokenizer import BPETokenizer

    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise GGUFTokenizerError(
            f"tokenizer.ggml.pre={pre!r} is not supported; lmforge reads {', '.join(PRE_TOKENIZERS)}",
            param="tokenizer.ggml.pre",
        )
    pre_tokenizer, ignore_merges = PRE_TOKENIZERS[pre]
    tokens, types = _tokens(meta, vocab_size)
    merges = [m.split(" ", 1) for m in meta.get("tokenizer.ggml.merges") or []]
    added = [
        {
            "id": i,
            "content": t,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": kind == CONTROL,
        }
        for i, (t, kind) in enumerate(zip(tokens, types))
        if kind in (CONTROL, USER_DEFINED)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": ignore_merges,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    try:
        tok = Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the Rust side raises a bare Exception on a bad document
        raise GGUFTokenizerError(
            f"the embedded BPE vocabulary does not build a tokenizer ({e})", param="tokenizer.ggml.tokens"
        ) from None

    def text(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    ends = [meta.get(k) for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")]
    return BPETokenizer(
        tok,
        text("tokenizer.ggml.eos_token_id"),
        text("tokenizer.ggml.bos_token_id"),
        [i for i in ends if i is not None],
    )


def llama_tokenizer(meta, vocab_size: int):
    """tokenizer.ggml.model "llama" -> lmforge's Llama2cTokenizer (the same SentencePiece-style BPE)."""
    from lmforge.tokenizer.llama2c import LLAMA2C_BOS_ID, LLAMA2C_EOS_ID, Llama2cTokenizer

    tokens, _ = _tokens(meta, vocab_size)
    scores = list(meta.get("tokenizer.ggml.scores") or [])
    layout = {
        "tokenizer.ggml.bos_token_id": LLAMA2C_BOS_ID,
        "tokenizer.ggml.eos_token_id": LLAMA2C_EOS_ID,
        "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_space_prefix": True,
    }
    for key, want in layout.items():
        value = meta.get(key, want)
        if value != want:
            raise GGUFTokenizerError(
                f"{key}={value!r}: lmforge's SentencePiece-style tokenizer has the Llama 2 layout ({key}={want!r})",
                param=key,
            )
    bytes_ok = len(tokens) >= LLAMA_BYTES + 256 and all(
        tokens[LLAMA_BYTES + b].upper() == f"<0X{b:02X}>" for b in range(256)
    )
    if not bytes_ok:
        raise GGUFTokenizerError(
            "tokenizer.ggml.tokens: the 256 byte pieces <0x00>..<0xFF> are not at ids 3..258 "
            "(the Llama 2 layout lmforge's SentencePiece-style tokenizer has)",
            param="tokenizer.ggml.tokens",
        )
    if len(scores) < len(tokens):
        raise GGUFTokenizerError(
            f"tokenizer.ggml.scores has {len(scores)} values for {len(tokens)} tokens", param="tokenizer.ggml.scores"
        )
    pieces = [t.replace(SPIECE_SPACE, " ").encode("utf-8") for t in tokens]
    return Llama2cTokenizer(pieces, scores[: len(tokens)], max(len(p) for p in pieces))


def read_vocab(meta, vocab_size: int) -> tuple[Tokenizer | None, dict[str, bytes]]:
    """(tokenizer or None, {file name: bytes} to keep with the model: chat_template.jinja, generation_config.json)."""
    kind = meta.get("tokenizer.ggml.model", "none")
    readers = {"gpt2": bpe_tokenizer, "llama": llama_tokenizer}
    if kind not in readers and kind != "none":
        raise GGUFTokenizerError(
            f"tokenizer.ggml.model={kind!r} is not supported; lmforge reads 'gpt2' (byte-level "
            f"BPE), 'llama' (SentencePiece-style) and 'none'",
            param="tokenizer.ggml.model",
        )
    tok = readers[kind](meta, vocab_size) if kind in readers else None
    extras: dict[str, bytes] = {}
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        extras[JINJA_FILE] = template.encode("utf-8")
    ends = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    ends = list(dict.fromkeys(i for i in ends if i is not None))
    if tok is not None and ends:
        extras["generation_config.json"] = json.dumps({"eos_token_id": ends[0] if len(ends) == 1 else ends}).encode()
    return tok, extras


__all__ = ["GGUFTokenizerError", "PRE_TOKENIZERS", "bpe_tokenizer", "llama_tokenizer", "read_vocab"]
