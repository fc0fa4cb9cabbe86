"""The proposers of speculative decoding inside the engine: a draft model, or prompt lookup (n-grams).

Both have `lookahead(seq)` (the most tokens it may propose for seq this step: the scheduler reserves KV slots and
budget for those only), `mirror(rows)` (keep up with what the target computes without speculating) and
`propose(seqs, ks)` (up to ks[b] tokens for seqs[b], and the distributions q they were drawn from, None where the
row is greedy). A proposal may be shorter than asked, or empty: the engine decodes a row without a proposal as a
plain row.

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

    def lookahead(self, seq) -> int:
        """Every decoding row gets k drafted tokens."""
        return self.k

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
    """One sequence's prompt lookup: its n-gram index, its record of how often the target's next token was the
    one lookup predicted (counts that fade, so recent text weighs most), and its last prediction (the position it
    was made at and the tokens), to see next time how much of it the target's tokens bear out."""

    def __init__(self, index: NgramIndex):
        self.index = index
        self.kept, self.tried = 0.0, 1.0  # a prior of one miss: a sequence proposes once lookup has been right
        self.last: tuple[int, list[int]] | None = None

    @property
    def rate(self) -> float:
        """The estimated chance that the target's next token is lookup's, given the ones before it were."""
        return self.kept / self.tried


class NgramProposer:
    """Prompt lookup (lmforge.infer.speculative.NgramIndex) for every decoding row: no model, no KV cache.

    Each sequence gets its own index the first time it is asked for a proposal, kept on the sequence
    (`Sequence.lookup`), so finished requests leave nothing behind. A sampled row's proposal comes with
    one-hot distributions, so the engine's one accept/reject rule checks it (and keeps the target's distribution).

    A proposal is made only where it is expected to pay. Checking a token costs a position in the target's
    forward whether it is kept or not (on a small model on CPU a step's cost grows with the tokens it feeds: four
    rows of 9 tokens cost 7x four rows of 1, and rows are padded to the longest proposal), while a kept token
    saves a step. So every step lookup predicts each sequence's next tokens, proposed or not, and the next call
    compares the prediction with the tokens the target then chose (one for a plain step, those it kept and its
    own after them for a checked proposal): each predicted token the target chose counts as kept, the first one it
    did not as tried too (both counts fade by `DECAY` a step). That measures, at no cost in the forward, the rate
    a at which a predicted token is the target's given the ones before it were, so a proposal's i-th token is kept
    with chance a**i; a proposal is as long as the tokens whose chance is at least `check_cost` (the cost of
    checking a token relative to the step a kept one saves), and empty where even the first falls short: text
    that does not repeat itself decodes as plain rows do (the scheduler holds no lookahead slots for it:
    `lookahead` is 0, and `mirror` makes its prediction), text that starts to repeat is noticed by the
    predictions. (For a sampled row the chance that the target's token equals the prediction is the chance that
    accept_reject keeps the one-hot proposal.) Which tokens are proposed never changes the output, only the work.
    """

    DECAY = 0.8

    def __init__(self, vocab_size: int, k: int, n_min: int = 2, n_max: int = 4, check_cost: float = 0.5):
        if k < 1:
            raise SpeculativeError(
                f"num_speculative_tokens={k} is out of range: prompt lookup proposes >= 1 token per step"
            )
        if not 0 < check_cost < 1:
            raise SpeculativeError(f"prompt lookup check_cost={check_cost} is out of range: need 0 < check_cost < 1")
        NgramIndex(n_min, n_max)  # checks the sizes now, not at the first request
        self.vocab_size, self.k, self.n_min, self.n_max = vocab_size, k, n_min, n_max
        self.check_cost = check_cost

    def lookahead(self, seq) -> int:
        """The tokens worth checking for seq this step, by its rate (0: it decodes as a plain row)."""
        return self._length(self._observe(seq).rate)

    def mirror(self, rows) -> None:
        """The prediction (not proposed) of each decoding row that `propose` did not see this step, so that its
        rate keeps up with the text: a row that stops proposing can start again."""
        for seq, n in rows:
            if n == 1 and seq.num_computed_tokens + 1 == seq.num_tokens:  # it chooses a token this step
                self._propose_one(seq, 0)

    def propose(self, seqs, ks: list[int]) -> tuple[list[list[int]], list[torch.Tensor | None]]:
        drafted = [self._propose_one(s, k) for s, k in zip(seqs, ks)]
        q = [one_hot(d, self.vocab_size) if s.generator is not None and d else None for s, d in zip(seqs, drafted)]
        return drafted, q  # no distributions for an empty proposal: most rows' most steps, where text does not repeat

    def _observe(self, seq) -> _Lookup:
        """seq's lookup, its rate updated by the tokens the target chose since its last prediction."""
        look = seq.lookup
        if look is None:
            look = seq.lookup = _Lookup(NgramIndex(self.n_min, self.n_max))
        tokens = seq.token_ids
        if look.last is not None and len(tokens) > look.last[0]:  # the target has chosen since the prediction
            at, predicted = look.last
            seen = tokens[at : at + len(predicted)]
            kept = next((i for i, (p, t) in enumerate(zip(predicted, seen)) if p != t), len(seen))
            look.kept = self.DECAY * look.kept + kept
            look.tried = self.DECAY * look.tried + kept + (kept < len(seen))
            look.last = None  # counted once
        return look

    def _propose_one(self, seq, room: int) -> list[int]:
        """Predict seq's next tokens (once a step) and propose the first min(room, worth checking) of them."""
        look = self._observe(seq)
        tokens = seq.token_ids
        if look.last is not None and look.last[0] == len(tokens):  # predicted already at this length
            return []
        length = min(room, self._length(look.rate))
        predicted = look.index.propose(tokens, max(1, length))
        look.last = (len(tokens), predicted) if predicted else None
        return predicted[:length]

    def _length(self, rate: float) -> int:
        """The tokens worth checking: those the target keeps with chance rate**i >= check_cost."""
        length, chance = 0, rate
        while length < self.k and chance >= self.check_cost:
            length, chance = length + 1, chance * rate
        return length
