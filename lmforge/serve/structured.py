"""Structured output: constrained decoding that masks every token that cannot continue a valid output.

A request's format (a JSON schema, any JSON object, a regex or a list of choices) becomes one regular
expression (for a schema: schema.py, which enforces every keyword exactly or refuses it); outlines-core compiles
it against the tokenizer's vocabulary into a token-level automaton (`Index`: state -> allowed token ids -> next
state), in a child process under a deadline (`build_index`). `TokenConstraint` is the per-request hook the sampler
calls (`SamplingParams.allowed_tokens`): given the tokens a sequence has produced so far, it returns the ids
allowed next. When the automaton is in a final state the end-of-sequence token is allowed too, and when
nothing else is, EOS is the only choice, so the output ends exactly when it is complete (finish_reason "stop").

The automaton needs each token's bytes: byte-level BPE spells bytes as printable symbols (GPT-2's table),
SentencePiece-style vocabularies use "▁" for a space and <0xNN> for raw bytes, char vocabularies are their
characters, llama2.c pieces are bytes. Word tokenizers put a space between words that no token spells, and a
model without an end-of-sequence token could never stop, so both are refused with a clear message.
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys
import threading
from collections import OrderedDict
from collections.abc import Sequence

from outlines_core import Index, Vocabulary

from lmforge.serve.jsonregex import StructuredOutputError
from lmforge.serve.schema import regex_for_schema
from lmforge.tokenizer.bpe import gpt2_byte_decoder

__all__ = [
    "StructuredOutputError",
    "ConstraintCompiler",
    "TokenConstraint",
    "regex_for_json_schema",
    "regex_for_choice",
    "check_regex",
    "token_bytes",
]


# ---------------------------------------------------------------------------------- formats -> one regex

JSON_OBJECT_SCHEMA = {"type": "object"}  # OpenAI's json_object mode: any JSON object


def regex_for_json_schema(schema: dict | str, param: str = "response_format") -> str:
    """The regex of JSON texts that validate against `schema` (lmforge.serve.schema: outlines-core's translation,
    made exact or refused by keyword)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise StructuredOutputError(f"{param}: the JSON schema is not valid JSON ({e})", param) from e
    return regex_for_schema(schema)


def regex_for_choice(choices: Sequence[str]) -> str:
    """Exactly one of the strings, literally."""
    if not choices or any(not isinstance(c, str) or not c for c in choices):
        raise StructuredOutputError("choice must be a non-empty list of non-empty strings", "choice")
    return "(" + "|".join(re.escape(c) for c in choices) + ")"


def check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise StructuredOutputError(f"regex {pattern!r} is not a valid regular expression ({e})", "regex") from e
    return pattern


# ---------------------------------------------------------------------------------- the vocabulary as bytes


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer) -> dict[int, bytes]:
    """Token id -> the bytes it adds to the text, for every ordinary (non-special) token of the tokenizer."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "char":
        return {i: ch.encode("utf-8") for i, ch in enumerate(tokenizer.vocab)}
    if kind == "llama2c":
        out = {}
        for i, piece in enumerate(tokenizer.pieces):
            if i in (tokenizer.bos_id, tokenizer.eos_id) or i == 0:
                continue
            m = _BYTE_PIECE.match(piece.decode("utf-8", "replace"))
            out[i] = bytes([int(m.group(1), 16)]) if m else piece
        return out
    if kind == "bpe":
        tok = tokenizer.tok
        special = set(tok.get_added_tokens_decoder())
        byte_level = '"ByteLevel"' in json.dumps(json.loads(tok.to_str()).get("decoder"))
        table = gpt2_byte_decoder() if byte_level else None
        out = {}
        for token, i in tok.get_vocab(with_added_tokens=False).items():
            if i in special:
                continue
            if table is not None:
                if all(ch in table for ch in token):
                    out[i] = bytes(table[ch] for ch in token)
                continue
            m = _BYTE_PIECE.match(token)
            out[i] = bytes([int(m.group(1), 16)]) if m else token.replace("\u2581", " ").encode("utf-8")
        return out
    raise StructuredOutputError(
        f"structured output needs a tokenizer whose tokens spell text on their own (char, byte-level BPE, "
        f"SentencePiece, llama2.c); this model's {kind!r} tokenizer joins tokens with spaces",
        "response_format",
    )


def build_vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """outlines-core's Vocabulary (bytes -> ids) of the tokens the model can emit, with the tokenizer's EOS."""
    eos = getattr(tokenizer, "eos_id", None)
    if eos is None:
        raise StructuredOutputError(
            "structured output needs a tokenizer with an end-of-sequence token so the "
            "output can end when it is complete; this model's tokenizer has none",
            "response_format",
        )
    groups: dict[bytes, list[int]] = {}
    for i, b in token_bytes(tokenizer).items():
        if i < vocab_size and i != eos and b:
            groups.setdefault(b, []).append(i)
    return Vocabulary(eos, groups)


# ---------------------------------------------------------------------------------- the per-request hook


class TokenConstraint:
    """`allowed_tokens(output_ids) -> ids` for SamplingParams: walks the automaton along the output so far.

    Stateless towards the caller (the n samples of a request share one instance); the state reached by each
    output prefix is memoised, so each step advances one token from the previous step's state.
    """

    def __init__(self, index: Index):
        self.index = index
        self._states: dict[tuple[int, ...], int | None] = {(): index.get_initial_state()}
        self._allowed: dict[int, list[int]] = {}  # state -> allowed ids (a string state may allow most tokens)
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:  # to an engine in another process: the automaton, not the memo or the lock
        return {"index": self.index}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["index"])

    def state(self, output_ids: Sequence[int]) -> int | None:
        """The automaton state after output_ids, or None when they left the language (cannot happen when masked)."""
        key = tuple(output_ids)
        with self._lock:
            if key in self._states:
                return self._states[key]
            prev = self.state(key[:-1]) if key else self.index.get_initial_state()
            nxt = None if prev is None else self.index.get_next_state(prev, key[-1])
            self._states[key] = nxt
            return nxt

    def __call__(self, output_ids: Sequence[int]) -> list[int]:
        state = self.state(output_ids)
        if state is None:
            return []
        if state not in self._allowed:
            self._allowed[state] = list(self.index.get_allowed_tokens(state))
        return self._allowed[state]

    def is_complete(self, output_ids: Sequence[int]) -> bool:
        state = self.state(output_ids)
        return state is not None and self.index.is_final_state(state)


_BUILD = """
import pickle, sys
from outlines_core import Index
pattern, vocabulary = pickle.load(sys.stdin.buffer)
try:
    answer = ("ok", Index(pattern, vocabulary))
except Exception as e:
    answer = ("error", str(e))
pickle.dump(answer, sys.stdout.buffer)
"""


def build_index(pattern: str, vocabulary: Vocabulary, param: str, timeout: float) -> Index:
    """outlines-core's automaton for `pattern`, built in a child Python that is killed after `timeout` seconds.

    The build can grow exponentially with the pattern (measured on a 300-token vocabulary: `(a|b)*a(a|b){20}`
    and a 16-digit number bound before a closing brace ran for minutes; a bounded string with escapes doubles
    with every few characters), and Rust code in a thread cannot be stopped; a process can. A fresh interpreter
    (not a fork) copies none of the server's threads; Index and Vocabulary travel pickled.
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", _BUILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        out, err = proc.communicate(pickle.dumps((pattern, vocabulary)), timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise StructuredOutputError(
            f"{param}: the format's automaton did not build within {timeout:g} s "
            f"(outlines-core's build grows very large for some patterns: long bounded "
            f"repeats, overlapping counted alternatives); simplify it",
            param,
        ) from None
    status, value = (
        pickle.loads(out)
        if proc.returncode == 0
        else ("error", f"the build process failed: {err.decode(errors='replace').strip().splitlines()[-1:]}")
    )
    if status != "ok":
        raise StructuredOutputError(
            f"{param}: the format cannot be built over this model's vocabulary ({value})", param
        )
    return value


class ConstraintCompiler:
    """Builds (and keeps the last few) automata for one model's tokenizer: compiling is the slow part, so it
    runs in a child process under a deadline (`build_index`), one build at a time."""

    def __init__(self, tokenizer, vocab_size: int, cache_size: int = 32, timeout: float = 20.0):
        self.tokenizer, self.vocab_size, self.cache_size, self.timeout = tokenizer, vocab_size, cache_size, timeout
        self._vocabulary: Vocabulary | None = None
        self._indexes: OrderedDict[str, Index] = OrderedDict()
        self._lock = threading.Lock()

    def constraint(self, pattern: str, param: str = "regex") -> TokenConstraint:
        with self._lock:
            if self._vocabulary is None:
                self._vocabulary = build_vocabulary(self.tokenizer, self.vocab_size)
            index = self._indexes.get(pattern)
            if index is None:
                index = build_index(pattern, self._vocabulary, param, self.timeout)
                self._indexes[pattern] = index
                if len(self._indexes) > self.cache_size:
                    self._indexes.popitem(last=False)
            self._indexes.move_to_end(pattern)
        return TokenConstraint(index)
