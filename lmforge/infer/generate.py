"""Generation: batched, streamed, with a KV cache; plus beam search (the `lmforge generate` verb that drives it is
lmforge.apps.generate).

`stream(model, prompts, params)` is the one decoding loop: prompts of different lengths are left-padded into
one batch and prefilled in one forward pass, n samples of a prompt share that prefill (its cache rows are
repeated), then each step feeds one token per live row. A row that finishes (stop token, stop string,
max_tokens) is dropped from the batch and from the cache, so it stops costing. The loop yields `Event`s --
row, token, text delta -- so a CLI or server streams for free; `generate` collects them into `Completion`s.

Greedy decoding gives the same tokens batched or alone, cached or not (tests/test_generate.py), because the
model masks padding slots and gives each row its own positions (`KVCache.pad`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.sampling import (
    SamplingParams,
    StopStrings,
    TokenLogprob,
    make_generator,
    sample_next,
    token_logprobs,
)
from lmforge.rope import long_rope_switch
from lmforge.tokenizer import IncrementalDecoder


@dataclass
class Event:
    """One step of one output row. `token` is None when the row ended on a stop/EOS token (not part of the
    output); `finish_reason` is set ("stop" or "length") on the row's last event."""

    row: int
    token: int | None
    text: str = ""  # newly printable text ("" without a tokenizer)
    logprob: TokenLogprob | None = None
    finish_reason: str | None = None


@dataclass
class Completion:
    """One finished output: rows are ordered prompt by prompt, n samples each."""

    prompt_index: int
    sample_index: int
    # Generated tokens: a stop/EOS token is not included; a stop string's tokens are (the text is cut before it).
    tokens: list[int] = field(default_factory=list)
    text: str | None = None  # decoded output, truncated before a stop string; None without a tokenizer
    finish_reason: str | None = None  # "stop" (stop token, EOS or stop string) | "length" (max_tokens)
    logprobs: list[TokenLogprob] | None = None


def end_tokens(tokenizer=None, eos_id: int | Collection[int] | None = None) -> set[int]:
    """The tokens that end an output (and are not part of it): `eos_id` (one id or several) when given, else the
    tokenizer's eos_id, and the tokenizer's `end_ids` (llama2.c's BOS; an imported model's generation_config.json
    list: Llama 3 instruct ends a turn with <|eot_id|>, a document with <|end_of_text|>)."""
    if eos_id is None:
        eos_id = getattr(tokenizer, "eos_id", None)
    ends = set() if eos_id is None else {int(eos_id)} if isinstance(eos_id, int) else set(map(int, eos_id))
    return ends | set(getattr(tokenizer, "end_ids", ()))


# ---------------------------------------------------------------------------------- cache rows


def select_cache_rows(cache, index: torch.Tensor) -> None:
    """Keep (and reorder or repeat) the batch rows of a `KVCache` given by index (B',): k, v and padding.

    Used to drop finished rows, to repeat a prompt's rows for n samples and to reorder beams.
    """
    cache.k = cache.k.index_select(1, index)
    cache.v = cache.v.index_select(1, index)
    if cache.pad is not None:
        pad = cache.pad.index_select(0, index)
        cache.pad = pad if bool(pad.any()) else None


def prefill(model, prompts: Sequence[Sequence[int]], max_len: int):
    """Left-pad prompts into one batch and run it through the model: (last logits (B, V), cache).

    Only the last position's hidden state goes through the output head.
    """
    device = next(model.parameters()).device
    L = max(len(p) for p in prompts)
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    tokens = torch.zeros(len(prompts), L, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens[b, L - len(p) :] = torch.as_tensor(p, dtype=torch.long)
    cache = model.new_cache(len(prompts), max_len, pad=pad)
    hidden = model.hidden(tokens, kv_cache=cache)[:, -1]  # (B, C)
    return model.logits(hidden), cache


def recompute_row(model, cache, row: int, tokens: Sequence[int]) -> torch.Tensor:
    """Compute row `row` of a contiguous cache again from all its tokens (those cached and the one just fed) in one
    forward, and return that row's next logits (V,). LongRoPE models need it when a sequence first reaches the
    original context (lmforge.rope.long_rope_switch): from then on every position turns by the long factors,
    the keys cached before too, as transformers' Phi-3 generation recomputes them."""
    device = cache.k.device
    fresh = model.new_cache(1, len(tokens))
    hidden = model.hidden(torch.tensor([list(tokens)], device=device), kv_cache=fresh)[0, -1]
    first = int(cache.pad[row]) if cache.pad is not None else 0  # the row's slots: first .. cache.length - 1
    assert first + len(tokens) == cache.length, "the row's tokens must be the ones its cache holds"
    cache.k[:, row, :, first : cache.length] = fresh.k[:, 0, :, : len(tokens)]
    cache.v[:, row, :, first : cache.length] = fresh.v[:, 0, :, : len(tokens)]
    return model.logits(hidden)


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed one token per row (B,) and return the next logits (B, V): through the model's fused decoder when it
    has one (lmforge.infer.fused), else its forward pass."""
    fused = getattr(model, "fused_decoder", None)
    if fused is not None and fused.accepts(cache):
        return fused(tokens, cache)
    return model(tokens[:, None], kv_cache=cache)[:, -1]


# ---------------------------------------------------------------------------------- prompts


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """Encode a prompt; an empty one starts from BOS (else EOS, else a newline for char/word models)."""
    if text:
        if tokenizer is None:
            raise ValueError(
                "this model has no tokenizer to encode the prompt; pass --tokenizer PATH "
                "(a tokenizer.json or a folder holding one)"
            )
        return tokenizer.encode(text)
    for start in (getattr(tokenizer, "bos_id", None), getattr(tokenizer, "eos_id", None)):
        if start is not None:
            return [start]
    if tokenizer is not None:
        try:
            return tokenizer.encode("\n")
        except ValueError:
            pass
    return [0]


def check_prompt(
    prompt: Sequence[int], params: SamplingParams, config, *, has_tokenizer: bool, name: str = "the prompt"
) -> list[int]:
    """The checks every way of generating makes before any work (`stream`/`generate` here, the serving engine's
    requests): the prompt is not empty and its ids are in the vocabulary, the sampling settings fit the
    vocabulary, stop strings come with a tokenizer to read them, and the prompt plus max_tokens fits the model's
    context (sinusoidal positions have no limit). `name` is how messages call the prompt; errors carry the
    parameter at fault. Returns the prompt as a list of ints.
    """
    prompt = [int(t) for t in prompt]
    V, ctx = config.vocab_size, config.block_size
    if not prompt:
        raise LmforgeError(f"{name} is empty; start it with the tokenizer's BOS/EOS token", param="prompt")
    if min(prompt) < 0 or max(prompt) >= V:
        raise LmforgeError(f"{name} holds token ids outside the model's vocabulary 0..{V - 1}", param="prompt")
    params.check_vocab(V)
    if params.stop and not has_tokenizer:
        raise LmforgeError(
            "stop strings need a tokenizer to decode text; pass tokenizer=... or use stop_token_ids", param="stop"
        )
    need = len(prompt) + params.max_tokens - 1  # positions fed to the model
    if config.pos != "sinusoidal" and need > ctx:
        raise LmforgeError(
            f"{name} ({len(prompt)} tokens) plus max_tokens={params.max_tokens} needs {need + 1} "
            f"positions but the model's context is {ctx}; shorten the prompt or lower max_tokens",
            param="max_tokens",
        )
    return prompt


# ---------------------------------------------------------------------------------- the decoding loop


class _Row:
    """The state of one output sequence during decoding."""

    def __init__(
        self,
        index: int,
        prompt_index: int,
        sample_index: int,
        prompt: Sequence[int],
        params: SamplingParams,
        stop_ids: set[int],
        device,
    ):
        self.index, self.prompt_index, self.sample_index = index, prompt_index, sample_index
        self.params = params
        self.context = list(prompt)  # prompt + generated, what penalties and bans look at
        self.prompt_len = len(prompt)
        self.generator = None if params.greedy else make_generator(params.seed, sample_index, device)
        self.stop_ids = stop_ids
        self.stops = StopStrings(params.stop)
        self.decoder: IncrementalDecoder | None = None  # the prompt's last token + the output, decoded as it grows
        self.anchor_len = 0  # characters the prompt's last token decodes to alone
        self.pushed = 0  # output tokens in the decoder

    @property
    def generated(self) -> list[int]:
        return self.context[self.prompt_len :]

    def text(self, tokenizer, final: bool) -> str:
        """continuation_text of the output so far, decoding only the tokens new since the last call."""
        if self.decoder is None:
            anchor = self.context[self.prompt_len - 1 : self.prompt_len]
            self.decoder, self.anchor_len = IncrementalDecoder(tokenizer), len(tokenizer.decode(anchor))
            self.decoder.push(anchor)
        new = self.context[self.prompt_len + self.pushed :]
        self.pushed += len(new)
        return self.decoder.push(new, final=final)[self.anchor_len :]


def continuation_text(tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> str:
    """Generated text decoded after the prompt's last token, so that context-dependent decoding (no space after
    BOS, word spacing) comes out as it would in the whole sequence."""
    anchor = list(prompt[-1:])
    return tokenizer.decode(anchor + list(generated))[len(tokenizer.decode(anchor)) :]


def per_prompt_params(params: Sequence[SamplingParams] | SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per prompt: the list given (its length checked), or the one given, n times."""
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise LmforgeError(
            f"got {n} prompts but {len(params)} SamplingParams; pass one per prompt or a single one for all"
        )
    return list(params)


def _normalise(model, prompts, params, has_tokenizer: bool) -> tuple[list[list[int]], list[SamplingParams]]:
    """One SamplingParams per prompt, every prompt checked (`check_prompt`)."""
    if not prompts:
        raise LmforgeError("generate needs at least one prompt", param="prompt")
    params = per_prompt_params(params, len(prompts))
    prompts = [
        check_prompt(p, sp, model.config, has_tokenizer=has_tokenizer, name=f"prompt {i}")
        for i, (p, sp) in enumerate(zip(prompts, params))
    ]
    return prompts, params


@torch.inference_mode()
def stream(
    model,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    *,
    tokenizer=None,
    eos_id: int | Collection[int] | None = None,
) -> Iterator[Event]:
    """Generate for every prompt at once, yielding an `Event` per row per step as tokens are chosen.

    Args:
        model: an lmforge `Transformer` (anything with hidden/logits/new_cache and the KV-cache forward).
        prompts: token id lists, of any lengths.
        params: one `SamplingParams` per prompt, or one for all. Rows are prompt-major: prompt i's sample j
            is row sum(n of prompts before i) + j.
        tokenizer: decodes text deltas and enables stop strings; its end tokens (`end_tokens`: its eos_id and any
            `end_ids`, e.g. llama2.c's BOS or an imported model's generation_config.json list) end a row unless
            ignore_eos.
        eos_id: the end-of-sequence token(s) when there is no tokenizer (or to override its eos_id).
    """
    ends = end_tokens(tokenizer, eos_id)
    prompts, params = _normalise(model, prompts, params, tokenizer is not None)

    device = next(model.parameters()).device
    rows: list[_Row] = []
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else ends)
        for j in range(sp.n):
            rows.append(_Row(len(rows), i, j, prompt, sp, stop_ids, device))
    max_len = max(len(p) for p in prompts) + max(sp.max_tokens for sp in params) - 1
    block = model.config.block_size
    if model.config.pos != "sinusoidal" and max_len > block:
        raise ValueError(
            f"the longest prompt plus max_tokens needs {max_len + 1} positions but the model's context "
            f"is {block}; shorten the prompt or lower max_tokens"
        )

    logits, cache = prefill(model, prompts, max_len)
    if len(rows) > len(prompts):  # n > 1: the samples of a prompt share its prefill
        index = torch.tensor([r.prompt_index for r in rows], device=logits.device)
        logits = logits.index_select(0, index)
        select_cache_rows(cache, index)
    live = rows
    want_logprobs = any(sp.logprobs is not None for sp in params)
    switch = long_rope_switch(model.config)
    while True:
        tokens = sample_next(
            logits,
            [r.params for r in live],
            [r.context for r in live],
            [r.prompt_len for r in live],
            [r.generator for r in live],
        )
        lps = token_logprobs(logits, tokens, [r.params.logprobs for r in live]) if want_logprobs else None
        keep = []
        for b, (row, token) in enumerate(zip(live, tokens.tolist())):
            event = _advance(row, token, lps[b] if lps else None, tokenizer)
            yield event
            if event.finish_reason is None:
                keep.append(b)
        if not keep:
            return
        if len(keep) < len(live):  # finished rows leave the batch and the cache
            index = torch.tensor(keep, device=tokens.device)
            select_cache_rows(cache, index)
            tokens = tokens.index_select(0, index)
            live = [live[b] for b in keep]
        logits = decode_step(model, tokens, cache)
        for b, row in enumerate(live):
            if switch is not None and len(row.context) - 1 == switch:  # its first token past the short factors
                logits[b] = recompute_row(model, cache, b, row.context)


def _advance(row: _Row, token: int, logprob: TokenLogprob | None, tokenizer) -> Event:
    """Append one chosen token to a row and decide whether the row is finished."""
    if token in row.stop_ids:
        text = row.stops.update(row.text(tokenizer, final=True), final=True) if tokenizer else ""
        return Event(row.index, None, text, logprob, "stop")
    row.context.append(token)
    done = len(row.context) - row.prompt_len >= row.params.max_tokens
    text = row.stops.update(row.text(tokenizer, final=done), final=done) if tokenizer else ""
    if row.stops.stopped:
        return Event(row.index, token, text, logprob, "stop")
    return Event(row.index, token, text, logprob, "length" if done else None)


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    params: Sequence[SamplingParams] | SamplingParams,
    *,
    tokenizer=None,
    eos_id: int | Collection[int] | None = None,
) -> list[Completion]:
    """Run `stream` to the end: one `Completion` per output row (prompt-major, n samples per prompt)."""
    out: dict[int, Completion] = {}
    for ev in stream(model, prompts, params, tokenizer=tokenizer, eos_id=eos_id):
        if ev.row not in out:
            out[ev.row] = Completion(0, 0, text="" if tokenizer is not None else None)
        c = out[ev.row]
        if ev.token is not None:
            c.tokens.append(ev.token)
        if ev.logprob is not None:
            c.logprobs = (c.logprobs or []) + [ev.logprob]
        if c.text is not None:
            c.text += ev.text
        c.finish_reason = ev.finish_reason
    completions, i = [], 0
    for p_index, sp in enumerate(per_prompt_params(params, len(prompts))):
        for s_index in range(sp.n):
            c = out[i]
            c.prompt_index, c.sample_index = p_index, s_index
            completions.append(c)
            i += 1
    return completions


# ---------------------------------------------------------------------------------- beam search


@torch.inference_mode()
def beam_search(
    model,
    prompt: Sequence[int],
    beam_width: int = 4,
    max_tokens: int = 64,
    length_penalty: float = 1.0,
    eos_id: int | Collection[int] | None = None,
) -> list[tuple[list[int], float]]:
    """The beam_width best continuations of one prompt, best first, as (tokens, score).

    score = sum of token logprobs / (number of generated tokens ** length_penalty), as Hugging Face scores
    finished hypotheses; a hypothesis ending in an end token (`eos_id`: one id or several, as `end_tokens`) counts
    it but does not return it. Search stops
    when beam_width hypotheses are finished and no live beam can beat the worst of them at its current length
    (Hugging Face's default heuristic), or after max_tokens. The beams are the rows of one KV cache, reordered
    after every step by the beam each survivor came from.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width} must be >= 1")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    prompt = list(map(int, prompt))
    ends = end_tokens(None, eos_id)
    logits, cache = prefill(model, [prompt], len(prompt) + max_tokens - 1)
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=logits.device)  # (W,) summed logprobs of the live beams
    finished: list[tuple[list[int], float]] = []
    W = beam_width

    def normalised(total: float, length: int) -> float:
        return total / (length**length_penalty)

    for step in range(1, max_tokens + 1):
        cand = (scores[:, None] + torch.log_softmax(logits.float(), dim=-1)).flatten()  # (W * V,)
        top_scores, top_idx = cand.topk(min(2 * W, cand.numel()))
        V = logits.shape[-1]
        new_beams, new_scores, parents = [], [], []
        for s, idx in zip(top_scores.tolist(), top_idx.tolist()):
            parent, token = divmod(idx, V)
            if token in ends:
                finished.append((beams[parent], normalised(s, step)))
            else:
                new_beams.append(beams[parent] + [token])
                new_scores.append(s)
                parents.append(parent)
            if len(new_beams) == W:
                break
        finished.sort(key=lambda h: -h[1])
        finished = finished[:W]
        done = len(finished) >= W and finished[-1][1] >= normalised(max(new_scores, default=-math.inf), step)
        if step == max_tokens or done or not new_beams:
            break
        index = torch.tensor(parents, device=logits.device)
        select_cache_rows(cache, index)
        beams, scores = new_beams, torch.tensor(new_scores, device=logits.device)
        logits = decode_step(model, torch.tensor([b[-1] for b in beams], device=logits.device), cache)
    if step == max_tokens:
        finished += [(b, normalised(s, step)) for b, s in zip(new_beams, new_scores)]
    return sorted(finished, key=lambda h: -h[1])[:W]
