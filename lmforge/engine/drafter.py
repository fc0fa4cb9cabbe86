"""The proposers of speculative decoding inside the engine: a draft model, or prompt lookup (n-grams).

Both have `mirror(rows)` (keep up with what the target computes without speculating) and `propose(seqs, ks)` (up
to ks[b] tokens for seqs[b], and the distributions q they were drawn from, None where the row is greedy). A
proposal may be shorter than asked, or empty: the engine decodes a row without a proposal as a plain row.

The draft model (`Drafter`):

The draft keeps its own paged KV pool with the target's block size and block count, indexed by the target's
block tables: a token's draft keys and values sit in the same block and slot as its target keys and values, so
the block manager (allocation, prefix caching, freeing) serves both models with one bookkeeping.

`mirror` runs the draft over the same prompt chunks (and plain decodes) as the target, so a sequence's draft
cache holds its prompt when it starts decoding (and prefix-cache hits hold the draft's keys too). `propose`
drafts k tokens per sequence, batched: the first forward feeds each sequence what its draft cache lacks (the last
token, and the token the target added after the draft's last accepted proposal), then one token per forward. A
sequence's `num_draft_computed` counts the leading tokens whose draft keys and values are valid; the engine sets
it after the target has accepted or rejected the proposals (lmforge.infer.speculative.accept_reject).
"""

from __future__ import annotations

import weakref

import torch

from lmforge.engine import forward
from lmforge.engine.paged_cache import PagedKVCache
from lmforge.infer.speculative import NgramIndex, SpeculativeError, draw, one_hot, processed, token_probs


class Drafter:
    def __init__(self, model, target_config, num_blocks: int, block_size: int, k: int):
        if k < 1:
            raise SpeculativeError(
                f"num_speculative_tokens={k} is out of range: the draft must propose >= 1 token per step"
            )
        V, Vd = target_config.vocab_size, model.config.vocab_size
        if V != Vd:
            raise SpeculativeError(
                f"the draft's vocabulary has {Vd} tokens but the target's has {V}: the two "
                f"models must share one tokenizer"
            )
        if model.config.pos != "sinusoidal" and model.config.block_size < target_config.block_size:
            raise SpeculativeError(
                f"the draft's context ({model.config.block_size}) is shorter than the target's "
                f"({target_config.block_size})"
            )
        p = next(model.parameters())
        self.model, self.k, self.device = model.eval(), k, p.device
        self.cache = PagedKVCache(model.config, num_blocks, block_size, dtype=p.dtype, device=p.device)

    def _forward(self, seqs, feeds: list[list[int]], starts: list[int]) -> torch.Tensor:
        """Feed feeds[b] at positions starts[b].. of seqs[b]; logits (B, V) at each row's last fed token."""
        return forward.logits(self.model, self.cache, [s.block_table for s in seqs], feeds, starts)

    def mirror(self, rows) -> None:
        """Run the draft over the tokens (sequence, new tokens) the target computes this step without speculating,
        and over any it lags behind by."""
        if not rows:
            return
        seqs = [s for s, _ in rows]
        starts = [min(s.num_draft_computed, s.num_computed_tokens) for s in seqs]
        ends = [s.num_computed_tokens + n for s, n in rows]
        self._forward(seqs, [s.token_ids[a:e] for s, a, e in zip(seqs, starts, ends)], starts)
        for s, e in zip(seqs, ends):
            s.num_draft_computed = e

    def propose(self, seqs, ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        """Draft ks[b] tokens for seqs[b]; returns the tokens and the distributions (ks[b], V) they were drawn from
        (None for a greedy row: its check compares argmaxes)."""
        drafted: list[list[int]] = [[] for _ in seqs]
        q_rows: list[list[torch.Tensor]] = [[] for _ in seqs]
        starts = [min(s.num_draft_computed, s.num_tokens - 1) for s in seqs]
        feeds = [s.token_ids[a:] for s, a in zip(seqs, starts)]
        active = list(range(len(seqs)))
        for i in range(max(ks)):
            logits = self._forward([seqs[b] for b in active], [feeds[b] for b in active], [starts[b] for b in active])
            for row, b in enumerate(active):
                s = seqs[b]
                context = s.token_ids + drafted[b]
                if s.generator is None:  # greedy: the argmax, no distribution
                    token = int(processed(logits[row : row + 1], s.params, context, s.prompt_len)[0].argmax())
                else:
                    q = token_probs(logits[row : row + 1], s.params, context, s.prompt_len)[0]
                    token = draw(q, s.generator)
                    q_rows[b].append(q)
                drafted[b].append(token)
                starts[b] += len(feeds[b])
                feeds[b] = [token]
            active = [b for b in active if ks[b] > i + 1]
        return drafted, [torch.stack(q) if s.generator is not None else None for s, q in zip(seqs, q_rows)]


class _Lookup:
    """One sequence's prompt lookup: its n-gram index, how long its proposals may be now, and its last proposal
    (the position it was proposed at and the tokens), to see next time how much of it the target kept."""

    def __init__(self, index: NgramIndex, length: int):
        self.index, self.length = index, length
        self.last: tuple[int, list[int]] | None = None
        self.wait, self.backoff = 0, 1  # steps to sit out, and the next pause's length


class NgramProposer:
    """Prompt lookup (lmforge.infer.speculative.NgramIndex) for every decoding row: no model, no KV cache.

    Each sequence gets its own index the first time it is asked for a proposal; the index lives as long as the
    sequence (a weak reference), so finished requests leave nothing behind. A sampled row's proposal comes with
    one-hot distributions, so the engine's one accept/reject rule checks it (and keeps the target's distribution).

    Proposal lengths adapt per sequence, since every rejected token is a position computed for nothing: after a
    proposal the target kept whole, the next may be 2 tokens longer (up to k); after one it cut short, the next is
    one longer than what it kept. A sequence whose 1-token proposal is rejected stops proposing for 1, 2, 4 .. 16
    steps (reset by the next kept token), so text that does not repeat itself decodes as plain rows do. How much the
    target kept is read off the sequence's tokens at the next call (an accepted token equals the proposed one, the
    token after them does not: accept_greedy and accept_reject give the target's own choice there), so nothing
    else has to report back. Which tokens are proposed never changes the output, only the work.
    """

    MAX_BACKOFF = 16

    def __init__(self, vocab_size: int, k: int, n_min: int = 2, n_max: int = 4):
        if k < 1:
            raise SpeculativeError(
                f"num_speculative_tokens={k} is out of range: prompt lookup proposes >= 1 token per step"
            )
        NgramIndex(n_min, n_max)  # checks the sizes now, not at the first request
        self.vocab_size, self.k, self.n_min, self.n_max = vocab_size, k, n_min, n_max
        self._lookups: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def mirror(self, rows) -> None:
        """Nothing to keep up with: the index reads each sequence's tokens when it proposes."""

    def propose(self, seqs, ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        drafted = [self._propose_one(s, k) for s, k in zip(seqs, ks)]
        return drafted, [None if s.generator is None else one_hot(d, self.vocab_size) for s, d in zip(seqs, drafted)]

    def _propose_one(self, seq, room: int) -> list[int]:
        look = self._lookups.get(seq)
        if look is None:
            look = self._lookups[seq] = _Lookup(NgramIndex(self.n_min, self.n_max), self.k)
        tokens = seq.token_ids
        if look.last is not None and len(tokens) > look.last[0]:  # the target has checked the last proposal
            at, proposed = look.last
            kept = next(
                (i for i, t in enumerate(proposed) if at + i >= len(tokens) or tokens[at + i] != t), len(proposed)
            )
            self._adapt(look, len(proposed), kept)
        look.last = None
        if look.wait > 0:
            look.wait -= 1
            return []
        drafted = look.index.propose(tokens, min(room, look.length))
        if drafted:
            look.last = (len(tokens), drafted)
        return drafted

    def _adapt(self, look: _Lookup, proposed: int, kept: int) -> None:
        if kept == proposed:
            look.length = min(self.k, look.length + 2)
        else:
            look.length = kept + 1
        if kept:
            look.backoff = 1
        elif proposed == 1:  # nothing kept of the shortest proposal: sit out a while, longer each time
            look.wait, look.backoff = look.backoff, min(self.MAX_BACKOFF, 2 * look.backoff)
