"""Generation: batched, streamed, with a KV cache; plus beam search and the `lmforge generate` command.

`stream(model, prompts, params)` is the one decoding loop: prompts of different lengths are left-padded into
one batch and prefilled in one forward pass, n samples of a prompt share that prefill (its cache rows are
repeated), then each step feeds one token per live row. A row that finishes (stop token, stop string,
max_tokens) is dropped from the batch and from the cache, so it stops costing. The loop yields `Event`s --
row, token, text delta -- so a CLI or server streams for free; `generate` collects them into `Completion`s.

Greedy decoding gives the same tokens batched or alone, cached or not (tests/test_generate.py), because the
model masks padding slots and gives each row its own positions (`KVCache.pad`).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, Sequence

import torch

from lmforge.infer.fused import prepare_for_decoding
from lmforge.infer.sampling import (SamplingParams, StopStrings, TokenLogprob, make_generator,
                                    sample_next, token_logprobs)


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
        tokens[b, L - len(p):] = torch.as_tensor(p, dtype=torch.long)
    cache = model.new_cache(len(prompts), max_len, pad=pad)
    hidden = model.hidden(tokens, kv_cache=cache)[:, -1]  # (B, C)
    return model.lm_head(hidden), cache


def decode_step(model, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Feed one token per row (B,) and return the next logits (B, V): through the model's fused decoder when it
    has one (lmforge.infer.fused), else its forward pass."""
    fused = getattr(model, "fused_decoder", None)
    if fused is not None and fused.accepts(cache):
        return fused(tokens, cache)
    return model(tokens[:, None], kv_cache=cache)[:, -1]


# ---------------------------------------------------------------------------------- the decoding loop

class _Row:
    """The state of one output sequence during decoding."""

    def __init__(self, index: int, prompt_index: int, sample_index: int, prompt: Sequence[int],
                 params: SamplingParams, stop_ids: set[int], device):
        self.index, self.prompt_index, self.sample_index = index, prompt_index, sample_index
        self.params = params
        self.context = list(prompt)  # prompt + generated, what penalties and bans look at
        self.prompt_len = len(prompt)
        self.generator = None if params.greedy else make_generator(params.seed, sample_index, device)
        self.stop_ids = stop_ids
        self.stops = StopStrings(params.stop)

    @property
    def generated(self) -> list[int]:
        return self.context[self.prompt_len:]

    def text(self, tokenizer) -> str:
        return continuation_text(tokenizer, self.context[:self.prompt_len], self.generated)


def continuation_text(tokenizer, prompt: Sequence[int], generated: Sequence[int]) -> str:
    """Generated text decoded after the prompt's last token, so that context-dependent decoding (no space after
    BOS, word spacing) comes out as it would in the whole sequence."""
    anchor = list(prompt[-1:])
    return tokenizer.decode(anchor + list(generated))[len(tokenizer.decode(anchor)):]


def _normalise(model, prompts, params) -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [list(map(int, p)) for p in prompts]
    if not prompts:
        raise ValueError("generate needs at least one prompt")
    params = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    if len(params) != len(prompts):
        raise ValueError(f"got {len(prompts)} prompts but {len(params)} SamplingParams; pass one per prompt "
                         f"or a single one for all")
    V = model.config.vocab_size
    for i, (p, sp) in enumerate(zip(prompts, params)):
        if not p:
            raise ValueError(f"prompt {i} is empty; start it with the tokenizer's BOS/EOS token")
        if min(p) < 0 or max(p) >= V:
            raise ValueError(f"prompt {i} holds token ids outside the model's vocabulary 0..{V - 1}")
        sp.check_vocab(V)
    return prompts, params


@torch.inference_mode()
def stream(model, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams] | SamplingParams, *,
           tokenizer=None, eos_id: int | None = None) -> Iterator[Event]:
    """Generate for every prompt at once, yielding an `Event` per row per step as tokens are chosen.

    Args:
        model: an lmforge `Transformer` (anything with hidden/lm_head/new_cache and the KV-cache forward).
        prompts: token id lists, of any lengths.
        params: one `SamplingParams` per prompt, or one for all. Rows are prompt-major: prompt i's sample j
            is row sum(n of prompts before i) + j.
        tokenizer: decodes text deltas and enables stop strings; its `eos_id` ends a row unless ignore_eos.
        eos_id: the end-of-sequence token when there is no tokenizer (or to override its).
    """
    eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
    prompts, params = _normalise(model, prompts, params)
    if tokenizer is None and any(p.stop for p in params):
        raise ValueError("stop strings need a tokenizer to decode text; pass tokenizer=... or use stop_token_ids")

    device = next(model.parameters()).device
    rows: list[_Row] = []
    for i, (prompt, sp) in enumerate(zip(prompts, params)):
        stop_ids = set(sp.stop_token_ids) | ({eos_id} if eos_id is not None and not sp.ignore_eos else set())
        for j in range(sp.n):
            rows.append(_Row(len(rows), i, j, prompt, sp, stop_ids, device))
    max_len = max(len(p) for p in prompts) + max(sp.max_tokens for sp in params) - 1
    block = model.config.block_size
    if model.config.pos != "sinusoidal" and max_len > block:
        raise ValueError(f"the longest prompt plus max_tokens needs {max_len + 1} positions but the model's context "
                         f"is {block}; shorten the prompt or lower max_tokens")

    logits, cache = prefill(model, prompts, max_len)
    if len(rows) > len(prompts):  # n > 1: the samples of a prompt share its prefill
        index = torch.tensor([r.prompt_index for r in rows], device=logits.device)
        logits = logits.index_select(0, index)
        select_cache_rows(cache, index)
    live = rows
    want_logprobs = any(sp.logprobs is not None for sp in params)
    while True:
        tokens = sample_next(logits, [r.params for r in live], [r.context for r in live],
                             [r.prompt_len for r in live], [r.generator for r in live])
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


def _advance(row: _Row, token: int, logprob: TokenLogprob | None, tokenizer) -> Event:
    """Append one chosen token to a row and decide whether the row is finished."""
    if token in row.stop_ids:
        text = row.stops.update(row.text(tokenizer), final=True) if tokenizer else ""
        return Event(row.index, None, text, logprob, "stop")
    row.context.append(token)
    done = len(row.context) - row.prompt_len >= row.params.max_tokens
    text = row.stops.update(row.text(tokenizer), final=done) if tokenizer else ""
    if row.stops.stopped:
        return Event(row.index, token, text, logprob, "stop")
    return Event(row.index, token, text, logprob, "length" if done else None)


def generate(model, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams] | SamplingParams, *,
             tokenizer=None, eos_id: int | None = None) -> list[Completion]:
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
        if tokenizer is not None:
            c.text += ev.text
        c.finish_reason = ev.finish_reason
    completions, i = [], 0
    plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
    for p_index, sp in enumerate(plist):
        for s_index in range(sp.n):
            c = out[i]
            c.prompt_index, c.sample_index = p_index, s_index
            completions.append(c)
            i += 1
    return completions


# ---------------------------------------------------------------------------------- beam search

@torch.inference_mode()
def beam_search(model, prompt: Sequence[int], beam_width: int = 4, max_tokens: int = 64,
                length_penalty: float = 1.0, eos_id: int | None = None) -> list[tuple[list[int], float]]:
    """The beam_width best continuations of one prompt, best first, as (tokens, score).

    score = sum of token logprobs / (number of generated tokens ** length_penalty), as Hugging Face scores
    finished hypotheses; a hypothesis ending in eos_id counts the EOS token but does not return it. Search stops
    when beam_width hypotheses are finished and no live beam can beat the worst of them at its current length
    (Hugging Face's default heuristic), or after max_tokens. The beams are the rows of one KV cache, reordered
    after every step by the beam each survivor came from.
    """
    if beam_width < 1:
        raise ValueError(f"beam_width={beam_width} must be >= 1")
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be >= 1")
    prompt = list(map(int, prompt))
    logits, cache = prefill(model, [prompt], len(prompt) + max_tokens - 1)
    beams: list[list[int]] = [[]]
    scores = torch.zeros(1, device=logits.device)  # (W,) summed logprobs of the live beams
    finished: list[tuple[list[int], float]] = []
    W = beam_width

    def normalised(total: float, length: int) -> float:
        return total / (length ** length_penalty)

    for step in range(1, max_tokens + 1):
        cand = (scores[:, None] + torch.log_softmax(logits.float(), dim=-1)).flatten()  # (W * V,)
        top_scores, top_idx = cand.topk(min(2 * W, cand.numel()))
        V = logits.shape[-1]
        new_beams, new_scores, parents = [], [], []
        for s, idx in zip(top_scores.tolist(), top_idx.tolist()):
            parent, token = divmod(idx, V)
            if token == eos_id:
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


# ---------------------------------------------------------------------------------- loading and the CLI

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_for_generation(model: str, dtype: str = "float32", tokenizer: str | None = None, device: str = "cpu",
                        quantize: str | None = None, adapter: str | None = None):
    """(model, tokenizer) ready for inference from a model folder, anything `lmforge.interop.load_any` opens,
    or a preset name (random weights, no tokenizer: for benchmarks).

    The one place the CLI verbs load a model; quantization and draft models hook in here. A float32 CPU model
    then gets the fast decode path (lmforge.infer.fused.prepare_for_decoding: the fused C++ decode step, which
    `generate`, speculative decoding and the serving engine use, where the model family allows; else linear
    layers packed for oneDNN). A LoRA `adapter` folder
    (lmforge.apps.lora) is merged into the float32 base weights first, before any dtype cast, quantization or
    packing.
    """
    from lmforge.config import PRESETS, ModelConfig

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    from lmforge.interop import load_any, load_tokenizer_path

    if model in PRESETS and not Path(model).exists():
        from lmforge.model import Transformer

        torch.manual_seed(0)
        net = Transformer(ModelConfig.from_name(model)).to(device=device, dtype=torch_dtype)
        tok = load_tokenizer_path(tokenizer, net.config.vocab_size) if tokenizer else None
    else:
        net, tok = load_any(model, tokenizer=tokenizer, device=device, dtype=None if adapter else torch_dtype)
    if adapter is not None:
        from lmforge.apps.lora import apply_adapter

        apply_adapter(net, adapter).to(dtype=torch_dtype)
    if quantize is not None and net.config.quantization is None:
        from lmforge.infer.quantize import quantize_model

        quantize_model(net, quantize)
    return prepare_for_decoding(net.eval()), tok


def prompt_tokens(tokenizer, text: str) -> list[int]:
    """Encode a prompt; an empty one starts from BOS (else EOS, else a newline for char/word models)."""
    if text:
        if tokenizer is None:
            raise ValueError("this model has no tokenizer to encode the prompt; pass --tokenizer PATH "
                             "(a tokenizer.json or a folder holding one)")
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


def print_outputs(model, tokenizer, prompts: list[list[int]], params: SamplingParams, streaming: bool,
                  beam_width: int, length_penalty: float, out=None) -> None:
    """Run generation and print it: text deltas as they come for one output, else each output in order."""
    out = sys.stdout if out is None else out
    decode = tokenizer.decode if tokenizer is not None else (lambda ids: " ".join(map(str, ids)))
    if beam_width > 0:
        eos = None if params.ignore_eos else getattr(tokenizer, "eos_id", None)
        for i, prompt in enumerate(prompts):
            beams = beam_search(model, prompt, beam_width, params.max_tokens, length_penalty, eos)
            for j, (tokens, score) in enumerate(beams[:params.n]):
                if len(prompts) > 1 or params.n > 1:
                    print(f"--- prompt {i} beam {j} (score {score:.4f}) ---", file=out)
                print(decode(tokens), file=out, flush=True)
        return
    if streaming and len(prompts) == 1 and params.n == 1 and params.logprobs is None and tokenizer is not None:
        for ev in stream(model, prompts, params, tokenizer=tokenizer):
            print(ev.text, end="", file=out, flush=True)
        print(file=out)
        return
    for c in generate(model, prompts, params, tokenizer=tokenizer):
        text = c.text if c.text is not None else decode(c.tokens)
        if params.logprobs is not None:
            lps = [{"token": lp.token, "logprob": lp.logprob, "top": lp.top} for lp in c.logprobs or []]
            print(json.dumps({"prompt": c.prompt_index, "sample": c.sample_index, "text": text, "tokens": c.tokens,
                              "finish_reason": c.finish_reason, "logprobs": lps}), file=out, flush=True)
            continue
        if len(prompts) > 1 or params.n > 1:
            print(f"--- prompt {c.prompt_index} sample {c.sample_index} ---", file=out)
        print(text, file=out, flush=True)


def generate_command(model: str, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                     top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                     presence_penalty: float = 0.0, frequency_penalty: float = 0.0, stop: list[str] = [],
                     ignore_eos: bool = False, seed: int | None = None, num_samples: int = 1,
                     logprobs: int | None = None, batch_file: str | None = None, stream: bool = True,
                     beam_width: int = 0, length_penalty: float = 1.0, tokenizer: str | None = None,
                     dtype: Literal["float32", "bfloat16"] = "float32", quantize: Literal["int8"] | None = None,
                     draft: str | None = None, speculative_k: int = 4, adapter: str | None = None,
                     controls: str | None = None) -> int:
    """Generate text from a model folder, a Hugging Face folder or a llama2.c file, streaming it as it comes.

    Args:
        model: model folder (config.json + model.safetensors + tokenizer), or a preset name for random weights.
        prompt: text to continue; empty starts from the tokenizer's BOS/EOS token.
        max_new_tokens: new tokens per output at most.
        temperature: sampling temperature; 0 is greedy decoding.
        top_k: sample only from the k most likely tokens; 0 keeps all.
        top_p: nucleus sampling: keep the most likely tokens up to this probability mass, in (0, 1].
        min_p: drop tokens less likely than this fraction of the most likely one, in [0, 1].
        repetition_penalty: > 1 discourages tokens already in the prompt or output (1 disables it).
        presence_penalty: subtracted once from the logit of every token already generated, in [-2, 2].
        frequency_penalty: subtracted per occurrence of a token in the output, in [-2, 2].
        stop: strings that end the output (the output is cut before them).
        ignore_eos: keep generating past the end-of-text token.
        seed: random seed for reproducible sampling.
        num_samples: outputs per prompt (with beam search: the best beams to print).
        logprobs: print JSON lines with each token's logprob and this many top alternatives.
        batch_file: file with one prompt per line; outputs are printed in the same order.
        stream: print text as it is generated (single prompt, single sample).
        beam_width: beam search with this many beams instead of sampling; 0 samples.
        length_penalty: beam scores divide by length ** length_penalty.
        tokenizer: tokenizer.json or folder to use instead of the model folder's own.
        dtype: weights and activations dtype.
        quantize: quantize the weights on load (int8, per-channel scales).
        draft: a smaller model sharing the tokenizer: speculative decoding (one prompt, one sample at a time).
        speculative_k: tokens the draft proposes per target forward.
        adapter: a LoRA adapter folder (from `lmforge finetune --method lora`) merged into the model on load.
        controls: banned phrases and word logit biases (JSON or text file, see lmforge.infer.controls); how often
            each fired is printed to stderr as a JSON line.
    """
    spec = None
    if controls is not None:
        from lmforge.infer.controls import Controls, ControlsError, load_controls

        if draft is not None or beam_width > 0:
            raise ControlsError("--controls works with sampling and greedy decoding, not with --draft or --beam-width")
        spec = load_controls(controls)
    net, tok = load_for_generation(model, dtype, tokenizer, quantize=quantize, adapter=adapter)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            min_p=min_p, repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                            frequency_penalty=frequency_penalty, stop=list(stop), ignore_eos=ignore_eos, seed=seed,
                            n=num_samples, logprobs=logprobs)
    guard = Controls(spec, tok, net.config.vocab_size).attach(params) if spec is not None else None
    if batch_file is not None:
        path = Path(batch_file)
        if not path.is_file():
            raise FileNotFoundError(f"batch file {path} does not exist")
        texts = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not texts:
            raise ValueError(f"batch file {path} holds no prompts (one per line expected)")
    else:
        texts = [prompt]
    prompts = [prompt_tokens(tok, t) for t in texts]
    if draft is not None:
        from lmforge.infer.speculative import speculative_generate

        draft_net, _ = load_for_generation(draft, dtype, tokenizer, quantize=quantize)
        for prompt_ids in prompts:
            tokens, stats = speculative_generate(net, draft_net, prompt_ids, params, k=speculative_k,
                                                 eos_id=None if params.ignore_eos else getattr(tok, "eos_id", None))
            print(continuation_text(tok, prompt_ids, tokens) if tok is not None else tokens, flush=True)
            print(json.dumps({"acceptance_rate": round(stats["acceptance_rate"], 3),
                              "tokens_per_round": round(stats["tokens_per_round"], 2)}), file=sys.stderr)
        return 0
    print_outputs(net, tok, prompts, params, stream, beam_width, length_penalty)
    if guard is not None:
        print(json.dumps({"controls": guard.counts()}), file=sys.stderr)
    return 0
