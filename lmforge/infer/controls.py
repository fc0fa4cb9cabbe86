"""Bias and safety controls: banned phrases and word-level logit biases from a file, applied while sampling.

A controls file is JSON (a `.json` file) or a plain text file:

    {"banned_phrases": ["darn", "heck no"],         # never in the output text
     "logit_bias": {"cat": 5, "dog": -100},         # added to the logits of the word's tokens, in [-100, 100]
     "ignore_case": false}                          # optional: match banned phrases in any letter case

    # the same as text: one control per line; blank lines and lines starting with '#' are skipped
    ban: darn
    ban: heck no
    bias: 5 cat
    bias: -100 dog
    ignore_case: false

In the text form a phrase or word may be written as a JSON string to keep its surrounding spaces (`ban: " heck"`).

Banned phrases are enforced on the decoded text, not on token ids: with BPE a phrase can be spelled by many token
sequences and can start or end inside a token, so a token ban on the phrase's canonical tokenization leaves the
others open. Before a chosen token is accepted, `ControlGuard.rejects` decodes the output with it and refuses it
if a banned phrase now occurs more often than without it; the sampler (`sampling.apply_guards`) then masks that
token and draws again. The output text therefore never contains a banned phrase, however the model spells it.

A logit bias names a word: the bias goes to every token id of the word's tokenization alone and after a space
(" cat", how a word appears inside a sentence with GPT-2 and Llama tokenizers), except whitespace-only tokens.
A word of several tokens biases each of them, which also moves those tokens in other words.

Fire counts: a banned phrase fires each time it makes the guard reject a token; a bias entry fires at each step
where the controls' biases change the model's most likely next token (argmax with and without them), counted for
every entry holding the token that was, or became, the most likely.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams

MAX_BIAS = 100.0  # OpenAI's logit_bias range, as SamplingParams checks it


class ControlsError(LmforgeError):
    """A controls file that cannot be used; the message names the file, the line or key, and the fix."""


@dataclass
class ControlSpec:
    """What a controls file says, before it meets a tokenizer."""

    banned_phrases: list[str] = field(default_factory=list)
    logit_bias: dict[str, float] = field(default_factory=dict)  # word -> bias
    ignore_case: bool = False

    def check(self, where: str) -> ControlSpec:
        for phrase in self.banned_phrases:
            if not isinstance(phrase, str) or not phrase:
                raise ControlsError(f"{where}: banned phrase {phrase!r} must be a non-empty string")
        for word, bias in self.logit_bias.items():
            if not isinstance(word, str) or not word.strip():
                raise ControlsError(f"{where}: logit_bias word {word!r} must be a non-empty string")
            if (
                isinstance(bias, bool)
                or not isinstance(bias, (int, float))
                or not math.isfinite(bias)
                or not -MAX_BIAS <= bias <= MAX_BIAS
            ):
                raise ControlsError(
                    f"{where}: logit_bias for {word!r} is {bias!r}; it must be a number in "
                    f"[-{MAX_BIAS:g}, {MAX_BIAS:g}]"
                )
        if not isinstance(self.ignore_case, bool):
            raise ControlsError(f"{where}: ignore_case must be true or false, got {self.ignore_case!r}")
        if not self.banned_phrases and not self.logit_bias:
            raise ControlsError(f"{where} holds no controls: give banned_phrases and/or logit_bias")
        return self


# ---------------------------------------------------------------------------------- reading files


def load_controls(path: str | Path) -> ControlSpec:
    """Read a controls file (JSON if it ends in .json, else the line format); ControlsError names what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ControlsError(f"controls file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ControlsError(f"controls file {path} is not UTF-8 text ({e})") from None
    spec = _parse_json(text, path) if path.suffix.lower() == ".json" else _parse_lines(text, path)
    return spec.check(f"controls file {path}")


def _parse_json(text: str, path: Path) -> ControlSpec:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ControlsError(f"controls file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ControlsError(f"controls file {path} must hold a JSON object, got {type(data).__name__}")
    known = {"banned_phrases", "logit_bias", "ignore_case"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ControlsError(f"controls file {path} has unknown keys {unknown}; known keys: {sorted(known)}")
    banned, bias = data.get("banned_phrases", []), data.get("logit_bias", {})
    if not isinstance(banned, list):
        raise ControlsError(f"controls file {path}: banned_phrases must be a list of strings")
    if not isinstance(bias, dict):
        raise ControlsError(f"controls file {path}: logit_bias must be an object mapping words to numbers")
    return ControlSpec(list(banned), dict(bias), data.get("ignore_case", False))


def _parse_lines(text: str, path: Path) -> ControlSpec:
    spec = ControlSpec()
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"controls file {path}, line {number}"
        key, sep, rest = line.partition(":")
        key, rest = key.strip().lower(), rest.strip()
        if not sep or key not in ("ban", "bias", "ignore_case"):
            raise ControlsError(
                f"{where}: expected 'ban: PHRASE', 'bias: NUMBER WORD' or 'ignore_case: true|false', got {raw!r}"
            )
        if key == "ban":
            spec.banned_phrases.append(_text_value(rest, where))
        elif key == "ignore_case":
            if rest.lower() not in ("true", "false"):
                raise ControlsError(f"{where}: ignore_case must be true or false, got {rest!r}")
            spec.ignore_case = rest.lower() == "true"
        else:
            number_text, _, word = rest.partition(" ")
            try:
                bias = float(number_text)
            except ValueError:
                raise ControlsError(
                    f"{where}: 'bias:' needs a number then a word (bias: -5 word), got {rest!r}"
                ) from None
            spec.logit_bias[_text_value(word.strip(), where)] = bias
    return spec


def _text_value(text: str, where: str) -> str:
    """A phrase as written, or the JSON string it spells when quoted (to keep leading/trailing spaces)."""
    if text.startswith('"'):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ControlsError(f"{where}: {text!r} starts with a quote but is not a JSON string ({e})") from None
        if not isinstance(value, str):
            raise ControlsError(f"{where}: {text!r} is not a string")
        return value
    if not text:
        raise ControlsError(f"{where}: the phrase or word is empty")
    return text


# ---------------------------------------------------------------------------------- bound to a tokenizer


class Controls:
    """A ControlSpec bound to a tokenizer: the token ids each bias word covers, and per-request guards.

    Args:
        spec: the controls (from `load_controls`).
        tokenizer: the model's tokenizer (encode/decode, optional eos_id and unk_id).
        vocab_size: the model's vocabulary size (token ids are checked against it).
    """

    def __init__(self, spec: ControlSpec, tokenizer, vocab_size: int):
        if tokenizer is None:
            raise ControlsError(
                "controls need the model's tokenizer (to decode text and tokenize words); this model "
                "has none: pass --tokenizer PATH"
            )
        self.spec, self.tokenizer, self.vocab_size = spec, tokenizer, vocab_size
        self.word_tokens = {word: self._word_tokens(word) for word in spec.logit_bias}
        self.token_bias: dict[int, float] = {}  # token id -> summed bias of the words holding it
        for word, ids in self.word_tokens.items():
            for t in ids:
                self.token_bias[t] = max(-MAX_BIAS, min(MAX_BIAS, self.token_bias.get(t, 0.0) + spec.logit_bias[word]))
        self.token_words: dict[int, list[str]] = {}
        for word, ids in self.word_tokens.items():
            for t in ids:
                self.token_words.setdefault(t, []).append(word)
        self.bias_vector = torch.zeros(vocab_size)
        for t, bias in self.token_bias.items():
            self.bias_vector[t] = bias

    @classmethod
    def from_file(cls, path: str | Path, tokenizer, vocab_size: int) -> Controls:
        return cls(load_controls(path), tokenizer, vocab_size)

    def _word_tokens(self, word: str) -> list[int]:
        """Token ids of the word's tokenizations alone and after a space, without whitespace-only tokens."""
        ids: list[int] = []
        variants = [word] if word[0].isspace() else [word, " " + word]
        for text in variants:
            try:
                encoded = self.tokenizer.encode(text)
            except ValueError as e:  # e.g. a character the char tokenizer has never seen
                raise ControlsError(f"logit_bias word {word!r} cannot be tokenized: {e}") from None
            for t in encoded:
                if t not in ids and (self.tokenizer.decode([t]).strip() or not word.strip()):
                    ids.append(t)
        unk = getattr(self.tokenizer, "unk_id", None)
        if unk is not None and unk in ids:
            raise ControlsError(
                f"logit_bias word {word!r} is not in the tokenizer's vocabulary (it encodes to "
                f"<unk>); remove it or use a word the model knows"
            )
        bad = [t for t in ids if t >= self.vocab_size]
        if not ids or bad:
            raise ControlsError(
                f"logit_bias word {word!r} tokenizes to {ids}, which the model's vocabulary of "
                f"{self.vocab_size} cannot bias"
            )
        return ids

    def attach(
        self, params: SamplingParams, on_fire: Callable[[str, str], None] | None = None, eos_id: int | None = None
    ) -> ControlGuard:
        """Apply the controls to one request's params (in place) and return its guard, which counts the fires.

        The controls' biases are added to the request's own logit_bias (sums clipped to [-100, 100]);
        `on_fire(kind, control)` is called at every fire ("banned_phrase" or "logit_bias"), e.g. a metrics counter.
        """
        bias = dict(params.logit_bias)
        for t, b in self.token_bias.items():
            bias[t] = max(-MAX_BIAS, min(MAX_BIAS, bias.get(t, 0.0) + b))
        params.logit_bias = bias
        from lmforge.infer.generate import end_tokens

        ends = end_tokens(self.tokenizer, eos_id)
        eos_id = eos_id if eos_id is not None else getattr(self.tokenizer, "eos_id", None)
        free = set(params.stop_token_ids) | (set() if params.ignore_eos else set(ends))
        params.guard = ControlGuard(self, free, eos_id, on_fire)
        return params.guard


class ControlGuard:
    """One request's view of the controls: vetoes tokens that would complete a banned phrase and counts fires.

    Shared by the request's n samples (their counts add up). Stop tokens (which end the output and are not part
    of it) are always accepted.
    """

    def __init__(
        self,
        controls: Controls,
        free_tokens: set[int],
        end_token: int | None,
        on_fire: Callable[[str, str], None] | None = None,
    ):
        self.controls, self.free, self.end_token, self.on_fire = controls, free_tokens, end_token, on_fire
        spec = controls.spec
        self.phrases = [p.lower() for p in spec.banned_phrases] if spec.ignore_case else list(spec.banned_phrases)
        longest = max((len(p) for p in self.phrases), default=0)
        # Decode at most this many trailing output tokens: a new occurrence ends in the last token's text and
        # spans at most `longest` characters; a token holds at least a byte and a character at most 4 bytes.
        self.window = 4 * longest + 16
        self.banned: Counter[str] = Counter({p: 0 for p in spec.banned_phrases})
        self.bias: Counter[str] = Counter({w: 0 for w in spec.logit_bias})
        self._vector: torch.Tensor | None = None

    def __getstate__(self) -> dict:
        """To an engine in another process without its hook (it reports fires back to this guard:
        lmforge.engine.remote) or its cached vector."""
        return self.__dict__ | {"on_fire": None, "_vector": None}

    def counts(self) -> dict:
        """{"banned_phrases": {phrase: fires}, "logit_bias": {word: fires}} (every control listed, 0 if silent)."""
        return {"banned_phrases": dict(self.banned), "logit_bias": dict(self.bias)}

    def _fire(self, kind: str, control: str) -> None:
        (self.banned if kind == "banned_phrase" else self.bias)[control] += 1
        if self.on_fire is not None:
            self.on_fire(kind, control)

    # -- the sampler's hooks (sampling.TokenGuard)
    def rejects(self, context: Sequence[int], prompt_len: int, token: int) -> bool:
        """True when appending `token` to the output would make a banned phrase occur (once more) in its text."""
        if not self.phrases or token in self.free:
            return False
        hits = {
            i
            for before, after in self._texts(context, prompt_len, token)
            for i, phrase in enumerate(self.phrases)
            if after.count(phrase) > before.count(phrase)
        }
        for i in sorted(hits):
            self._fire("banned_phrase", self.controls.spec.banned_phrases[i])
        return bool(hits)

    def _texts(self, context: Sequence[int], prompt_len: int, token: int) -> list[tuple[str, str]]:
        """(text before, text after) the token, decoded as each output path decodes it: the output alone (the
        serving engine) and after the prompt's last token (lmforge.infer.generate.continuation_text)."""
        decode = self.controls.tokenizer.decode
        out = list(context[prompt_len:])
        start = max(0, len(out) - self.window)
        tail = out[start:]
        pairs = [(decode(tail), decode(tail + [token]))]
        if start == 0 and prompt_len > 0:
            anchor = [context[prompt_len - 1]]
            head = len(decode(anchor))
            pairs.append((decode(anchor + tail)[head:], decode(anchor + tail + [token])[head:]))
        if self.controls.spec.ignore_case:
            pairs = [(a.lower(), b.lower()) for a, b in pairs]
        return pairs

    def observe(self, logits: torch.Tensor) -> None:
        """Count the bias entries that change this step's most likely token."""
        if not self.controls.token_bias:
            return
        if self._vector is None or self._vector.device != logits.device:
            self._vector = self.controls.bias_vector.to(logits.device)
        raw = logits.float()
        top, biased = int(raw.argmax()), int((raw + self._vector).argmax())
        if top != biased:
            words = dict.fromkeys(self.controls.token_words.get(top, []) + self.controls.token_words.get(biased, []))
            for word in words:
                self._fire("logit_bias", word)


def merge_counts(total: dict, counts: dict) -> dict:
    """Add one guard's `counts()` into a running total of the same shape (for a chat session or a batch)."""
    for kind, per in counts.items():
        bucket = total.setdefault(kind, {})
        for control, n in per.items():
            bucket[control] = bucket.get(control, 0) + n
    return total
