"""Speculative decoding: a small draft model proposes k tokens, the target model checks them all in one forward.

Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023,
"Accelerating Large Language Model Decoding with Speculative Sampling". One round:

1. the draft samples x_1..x_k autoregressively from its distributions q_1..q_k (k cheap forwards);
2. the target runs once over [last token, x_1..x_k] and gets its distributions p_1..p_{k+1};
3. `accept_reject` keeps a prefix of the draft and adds one token of the target's, so every round yields
   between 1 and k+1 tokens for one target forward.

The accept/reject rule makes the output follow the target's distribution exactly, whatever the draft. Greedy
decoding is the same rule with one-hot distributions (the argmax of each model's processed logits): a draft
token is accepted iff it is the target's argmax, and a rejection puts the target's argmax in its place, so the
tokens are those of plain greedy decoding.

Both models keep a KV cache holding every context token but the last; after a round the caches are cropped
(`KVCache.crop`) back to the accepted context, and each forward first feeds whatever context its cache lacks
(the prompt on the first round, an accepted draft token the draft never fed). Batch size is 1.

Prompt lookup (Saxena 2023, "Prompt Lookup Decoding"; vLLM's and transformers' n-gram proposers) drafts without a
model: the last n tokens of the context (n from n_max down to n_min) are looked up earlier in the context (the
prompt and the output so far), and up to k tokens that followed their most recent occurrence are proposed. Where
the output repeats the input (editing code, extracting fields, quoting) whole runs are accepted per target
forward; where nothing matches nothing is proposed and the round is a plain decoding step. The draft is
deterministic, a one-hot q, and the accept/reject rule with a one-hot q keeps the target's distribution: x is kept
with probability p(x), and a rejection draws from norm(max(0, p - onehot(x))), which is p without x; so a token
y != x comes out with probability (1 - p(x)) * p(y) / (1 - p(x)) = p(y).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch

from lmforge.errors import LmforgeError
from lmforge.infer.generate import end_tokens
from lmforge.infer.sampling import SamplingParams, make_generator, process_logits


class SpeculativeError(LmforgeError):
    """A speculative decoding request that cannot run; the message names the setting and the fix."""


def processed(logits: torch.Tensor, params: SamplingParams, context: Sequence[int], prompt_len: int) -> torch.Tensor:
    """`sampling.process_logits` for logits (N, V) whose row i predicts the token after
    context[:len(context) - N + 1 + i]."""
    N = logits.shape[0]
    if params.plain and params.greedy:
        return logits  # nothing to apply: the argmax is the raw one
    contexts = [context] * N if params.plain else [context[: len(context) - N + 1 + i] for i in range(N)]
    return process_logits(logits, [params] * N, contexts, [prompt_len] * N)


def token_probs(logits: torch.Tensor, params: SamplingParams, context: Sequence[int], prompt_len: int) -> torch.Tensor:
    """The distributions (N, V) a sampled (not greedy) row draws from, for logits (N, V) as in `processed`: the
    softmax of the logits after penalties, temperature and top-k/top-p/min-p."""
    return processed(logits, params, context, prompt_len).softmax(dim=-1)


def accept_greedy(draft_tokens: Sequence[int], best: Sequence[int]) -> list[int]:
    """`accept_reject` for greedy decoding, where both distributions are one-hot: keep the draft while it is the
    target's argmax (best: k+1 argmaxes), then add the target's argmax at the first miss (or after the last draft)."""
    j = next((i for i, t in enumerate(draft_tokens) if t != best[i]), len(draft_tokens))
    return list(draft_tokens[:j]) + [best[j]]


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs, 1, generator=generator)[0])


def accept_reject(
    draft_tokens: Sequence[int], q: torch.Tensor, p: torch.Tensor, generator: torch.Generator
) -> list[int]:
    """The tokens one round yields: the accepted prefix of the draft, then one token drawn for the target.

    draft_tokens: x_1..x_k, drawn from the draft's distributions q (k, V); p (k+1, V): the target's
    distributions at the same k positions and one more.
    """
    for i, x in enumerate(draft_tokens):
        # Accept x_i with probability min(1, p_i(x_i) / q_i(x_i)).
        if q[i, x] <= p[i, x] or torch.rand((), generator=generator) * q[i, x] < p[i, x]:
            continue
        # Rejected: draw the replacement from norm(max(0, p_i - q_i)), the part of p that q under-covers.
        residual = (p[i] - q[i]).clamp(min=0)
        residual = residual if float(residual.sum()) > 0 else p[i]  # only reachable through rounding
        return list(draft_tokens[:i]) + [draw(residual, generator)]
    # All k accepted: draw one more token from p_{k+1}, which the target computed anyway.
    return list(draft_tokens) + [draw(p[len(draft_tokens)], generator)]


def one_hot(tokens: Sequence[int], vocab_size: int) -> torch.Tensor:
    """The distributions (k, V) of a deterministic draft (prompt lookup): all mass on each proposed token."""
    return torch.nn.functional.one_hot(torch.tensor(list(tokens), dtype=torch.long), vocab_size).float()


class NgramIndex:
    """Prompt lookup over one growing token list: propose the tokens that followed the most recent earlier
    occurrence of its last n tokens, trying n from n_max down to n_min.

    An index maps every n-gram (n_min <= n <= n_max) to the position of its most recent end, for n-grams that end
    before the list's last token; `propose` first indexes what was appended since its last call, so a step costs a
    few dictionary operations per new token, not a scan of the context. Tokens are only ever appended (speculative
    decoding keeps only accepted tokens), so the index never has to forget.
    """

    def __init__(self, n_min: int = 2, n_max: int = 4):
        if not 1 <= n_min <= n_max:
            raise SpeculativeError(f"prompt lookup n-gram sizes n_min={n_min}, n_max={n_max}: need 1 <= n_min <= n_max")
        self.n_min, self.n_max = n_min, n_max
        self._end: dict[tuple[int, ...], int] = {}  # n-gram -> position of its most recent last token
        self._indexed = 0  # n-grams ending before this position are in the index

    def propose(self, tokens: Sequence[int], k: int) -> list[int]:
        """Up to k tokens to propose after `tokens` (empty when its last n-grams never occurred before)."""
        L = len(tokens)
        for end in range(self._indexed, L - 1):  # every n-gram that ends before the last token
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                self._end[tuple(tokens[end - n + 1 : end + 1])] = end
        self._indexed = max(self._indexed, L - 1)
        for n in range(min(self.n_max, L), self.n_min - 1, -1):
            last = self._end.get(tuple(tokens[L - n :]))
            if last is not None:
                return list(tokens[last + 1 : last + 1 + k])
        return []


def feed(model, cache, sequence: Sequence[int], last: int) -> torch.Tensor:
    """Run the tokens of `sequence` that `cache` lacks through `model`; logits (last, V) of its last positions."""
    device = next(model.parameters()).device
    new = torch.tensor(sequence[cache.length :], dtype=torch.long, device=device)[None]  # (1, T)
    fused = getattr(model, "fused_decoder", None)  # lmforge.infer.fused: a few tokens in one call
    if fused is not None and fused.accepts(cache, new.shape[1]):
        return fused(new, cache, last)[0]
    hidden = model.hidden(new, kv_cache=cache)[0, -last:]  # (last, C): only these go through the head
    return model.logits(hidden)


def _check(target, draft, prompt: list[int], params: SamplingParams, k: int) -> None:
    if k < 1:
        raise SpeculativeError(f"speculative k={k} is out of range: the draft must propose >= 1 token per round")
    V = target.config.vocab_size
    if not isinstance(draft, NgramIndex) and draft.config.vocab_size != V:
        raise SpeculativeError(
            f"the draft's vocabulary has {draft.config.vocab_size} tokens but the target's has "
            f"{V}: the two models must share one tokenizer"
        )
    if not prompt:
        raise SpeculativeError("the prompt is empty; start it with the tokenizer's BOS/EOS token")
    if min(prompt) < 0 or max(prompt) >= V:
        raise SpeculativeError(f"the prompt holds token ids outside the vocabulary 0..{V - 1}")
    for name, bad in (("n", params.n != 1), ("stop", bool(params.stop)), ("logprobs", params.logprobs is not None)):
        if bad:
            raise SpeculativeError(
                f"sampling setting {name}={getattr(params, name)!r} is not supported by "
                f"speculative decoding (one sample, stop token ids only, no logprobs)"
            )
    params.check_vocab(V)


def _draft(
    draft, cache, context: list[int], k: int, params: SamplingParams, prompt_len: int, generator
) -> tuple[list[int], torch.Tensor | None]:
    """k tokens from the draft model, one forward each, and (sampling) the distributions q (k, V) they came from."""
    drafted: list[int] = []
    q_rows: list[torch.Tensor] = []  # the draft's distribution at each drafted token (sampled rows)
    for _ in range(k):
        sequence = context + drafted
        logits = feed(draft, cache, sequence, 1)
        if params.greedy:  # the rule with one-hot distributions, without building them (accept_greedy)
            drafted.append(int(processed(logits, params, sequence, prompt_len)[0].argmax()))
            continue
        q = token_probs(logits, params, sequence, prompt_len)[0]
        drafted.append(draw(q, generator))
        q_rows.append(q)
    return drafted, (torch.stack(q_rows) if q_rows else None)


@torch.inference_mode()
def speculative_generate(
    target,
    draft,
    prompt_ids: Sequence[int],
    params: SamplingParams | None = None,
    k: int = 4,
    *,
    eos_id: int | Collection[int] | None = None,
) -> tuple[list[int], dict]:
    """Continue one prompt with the target's distribution, drafting up to k tokens per target forward.

    Args:
        target: the model whose distribution the output follows (an lmforge Transformer).
        draft: a smaller model with the same tokenizer (vocabulary) and at least the same context length, or an
            `NgramIndex` (prompt lookup: no model).
        prompt_ids: the prompt's token ids.
        params: sampling settings (temperature 0 is greedy; penalties, top-k/top-p/min-p and seed apply to
            both models); one sample, stop token ids but not stop strings.
        k: draft tokens proposed per round (prompt lookup proposes up to k, or none).
        eos_id: the token (or tokens) that end the output (not included) unless params.ignore_eos.

    Returns:
        (generated token ids, stats) with stats: acceptance_rate (accepted / proposed draft tokens), proposed,
        accepted, rounds (= target forwards), tokens_per_round, finish_reason ("stop" or "length").
    """
    params = params or SamplingParams()
    prompt = [int(t) for t in prompt_ids]
    _check(target, draft, prompt, params, k)
    stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(end_tokens(None, eos_id)))
    max_len = len(prompt) + params.max_tokens - 1  # the last token is never fed
    lookup = draft if isinstance(draft, NgramIndex) else None
    target_cache = target.new_cache(1, max_len)
    draft_cache = draft.new_cache(1, max_len) if lookup is None else None
    generator = make_generator(params.seed)
    V = target.config.vocab_size

    context = list(prompt)
    proposed = accepted = rounds = 0
    finish_reason = "length"
    while len(context) - len(prompt) < params.max_tokens:
        k_round = min(k, params.max_tokens - (len(context) - len(prompt)) - 1)  # never run past max_tokens
        if lookup is not None:
            drafted = lookup.propose(context, k_round) if k_round > 0 else []
            q = None if params.greedy else one_hot(drafted, V)
        else:
            drafted, q = _draft(draft, draft_cache, context, k_round, params, len(prompt), generator)
        sequence = context + drafted
        logits = feed(target, target_cache, sequence, len(drafted) + 1)
        if params.greedy:
            new = accept_greedy(drafted, processed(logits, params, sequence, len(prompt)).argmax(-1).tolist())
        else:
            p = token_probs(logits, params, sequence, len(prompt))
            new = accept_reject(drafted, q if q is not None else p[:0], p, generator)
        proposed, accepted, rounds = proposed + len(drafted), accepted + len(new) - 1, rounds + 1

        stop_at = next((i for i, t in enumerate(new) if t in stop_ids), None)
        context += new if stop_at is None else new[:stop_at]
        if stop_at is not None:
            finish_reason = "stop"
            break
        target_cache.crop(len(context) - 1)  # forget rejected draft tokens
        if draft_cache is not None:
            draft_cache.crop(len(context) - 1)

    generated = context[len(prompt) :]
    stats = {
        "acceptance_rate": accepted / proposed if proposed else 0.0,
        "proposed": proposed,
        "accepted": accepted,
        "rounds": rounds,
        "tokens_per_round": len(generated) / max(rounds, 1),
        "finish_reason": finish_reason,
    }
    return generated, stats
