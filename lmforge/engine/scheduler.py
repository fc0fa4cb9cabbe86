"""The scheduler: which sequences run in the next step, and how many of their tokens each computes.

As vLLM v1's scheduler: there is no prefill phase and decode phase. Every sequence has `num_computed_tokens`
catching up with its `num_tokens`; a step gives each running sequence up to (tokens still to compute) new
tokens under a per-step budget of `max_num_batched_tokens`. A decoding sequence asks for 1, a fresh prompt for
all of it, and a prompt longer than what the budget leaves is split over steps (chunked prefill). Sequences with
the fewest tokens to compute are served first, so a long prompt never stalls the running decodes: they take
their one token each and the prompt's chunk takes what is left.

Continuous batching: between two steps, finished sequences leave (their blocks are freed) and waiting ones join
while there is budget, room under `max_num_seqs` and KV blocks for their first chunk.

Speculative decoding (`num_lookahead_tokens` > 0): a decoding sequence also gets KV slots and budget for the
draft tokens the target checks in the same forward (as many as its max_tokens still allows, and as the proposer
may propose for it this step: `proposes`, where prompt lookup expects to propose nothing no slots are held), and a
step may then give it several tokens.

Preemption by recomputation: when a running sequence needs a block and none is free, the newest other running
sequence gives all its blocks back and returns to the front of the waiting queue; when it is admitted again it
recomputes its tokens (prompt and output so far), often from the prefix cache. The same path serves LongRoPE
models (`recompute_at`, lmforge.rope.long_rope_switch): a sequence that grows past the original context has its
keys turned by the long factors from then on, all of them, so it is computed again, under a prefix-cache salt of
its own, as transformers' Phi-3 generation recomputes its cache there.

Sliding windows (`window`: a model whose every layer has one, Mistral's): once computed, a sequence's blocks that
lie wholly behind the window of its next query go back to the pool (BlockManager.release_before), so its memory
follows the window, not its length.

The scheduler needs no model: tests drive `schedule()` and `update_from_output()` with hand-made tokens.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lmforge.engine.block_manager import BlockManager
from lmforge.engine.sequence import Sequence, Status


@dataclass
class SchedulerOutput:
    """One step's plan: (sequence, number of new tokens to compute) rows, who was preempted to make room, and
    how many draft tokens each speculating sequence may have checked (seq_id -> lookahead)."""

    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    lookahead: dict[int, int] = field(default_factory=dict)

    @property
    def num_batched_tokens(self) -> int:
        return sum(n for _, n in self.scheduled) + sum(self.lookahead.values())

    def samples(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether this row catches up with all its tokens, so its last position's logits choose a token."""
        return seq.num_computed_tokens + num_new_tokens == seq.num_tokens


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 256,
        num_lookahead_tokens: int = 0,
        recompute_at: int | None = None,
        window: int | None = None,
        proposes: Callable[[Sequence], int] | None = None,
    ):
        if max_num_seqs < 1 or max_num_batched_tokens < 1 or num_lookahead_tokens < 0:
            raise ValueError(
                f"max_num_seqs={max_num_seqs} and max_num_batched_tokens={max_num_batched_tokens} "
                f"must both be >= 1 and num_lookahead_tokens={num_lookahead_tokens} >= 0"
            )
        self.block_manager = block_manager
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.num_lookahead_tokens = num_lookahead_tokens
        self.proposes = proposes  # the most draft tokens the proposer may propose for a sequence this step
        self.recompute_at = recompute_at  # LongRoPE's switch: sequences longer than this are computed "long"
        self.window = window  # every layer's sliding window: blocks behind it go back to the pool as sequences run
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- schedule ------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, fewest tokens to compute first (decodes before prefill chunks).
        for seq in sorted(self.running, key=lambda s: (s.num_to_compute, s.seq_id)):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted earlier in this loop
                continue
            if self.salt(seq) != seq.cache_salt:  # it grew past LongRoPE's switch: every key is computed again
                self._release(seq)
                continue
            n = min(seq.num_to_compute, budget)
            ahead = (
                self._lookahead(seq, budget - n) if self.num_lookahead_tokens and n == seq.num_to_compute == 1 else 0
            )
            while not bm.allocate_slots(seq, n + ahead):
                victim = self._pick_victim(seq, out)
                self._preempt(victim, out)
                if victim is seq:
                    break
            else:
                out.scheduled.append((seq, n))
                if ahead:
                    out.lookahead[seq.seq_id] = ahead
                budget -= n + ahead

        # 2. Waiting sequences join, oldest first, unless this step already had to preempt.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not out.preempted:
            seq = self.waiting[0]
            seq.cache_salt = self.salt(seq)
            hits = bm.match_prefix(seq.token_ids, seq.prefix_salt)
            n = min(seq.num_tokens - len(hits) * bm.block_size, budget)
            if not bm.allocate_slots(seq, n, hits):
                break  # no room for its first chunk: it waits for blocks to be freed
            seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * bm.block_size
            seq.num_draft_computed = seq.num_computed_tokens  # a draft model's cache (if any) holds the same prefix
            self.num_prefix_hit_tokens += seq.num_cached_tokens
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.scheduled.append((seq, n))
            budget -= n
        return out

    def _lookahead(self, seq: Sequence, budget: int) -> int:
        """Draft tokens a decoding sequence may have checked: never past its max_tokens or the step's budget."""
        if seq.params.guard is not None:  # text-level controls vet each token as it is sampled: no drafts
            return 0
        room = seq.params.max_tokens - (seq.num_tokens - seq.prompt_len) - 1
        if room <= 0 or budget <= 0:
            return 0
        wanted = self.proposes(seq) if self.proposes is not None else self.num_lookahead_tokens
        return max(0, min(self.num_lookahead_tokens, wanted, room, budget))

    def _pick_victim(self, seq: Sequence, out: SchedulerOutput) -> Sequence:
        """The newest running sequence not already given work this step; `seq` itself when there is none."""
        busy = {s.seq_id for s, _ in out.scheduled}
        others = [s for s in self.running if s is not seq and s.seq_id not in busy]
        return max(others, key=lambda s: s.seq_id) if others else seq

    def salt(self, seq: Sequence) -> str | None:
        """How a sequence's keys are computed: "long" past LongRoPE's switch, else None (the one way)."""
        return "long" if self.recompute_at is not None and seq.num_tokens > self.recompute_at else None

    def _release(self, seq: Sequence) -> None:
        """Give back all of a running sequence's blocks; it waits at the front, to compute its tokens again."""
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self._release(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    # ---- update --------------------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[int, list[int]]) -> list[Sequence]:
        """Record a step's work and its sampled tokens (seq_id -> tokens); return the sequences that got some.

        A step gives a sequence one token, or several when it speculated: then all but the last were fed to
        the model in this step's forward (accepted draft tokens), so their keys and values are cached too.
        A token in the sequence's stop ids ends it with reason "stop" and is not part of the output; reaching
        max_tokens ends it with "length". Finished sequences leave and free their blocks now.
        """
        advanced = []
        for seq, n in out.scheduled:
            if seq.status is not Status.RUNNING:  # aborted between schedule and update
                continue
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < seq.num_tokens:
                self._computed(seq)
                continue  # a prefill chunk: nothing to sample yet
            tokens = sampled[seq.seq_id]
            advanced.append(seq)
            stop = next((i for i, t in enumerate(tokens) if t in seq.stop_ids), None) if seq.stop_ids else None
            keep = tokens[:stop][: seq.params.max_tokens - (seq.num_tokens - seq.prompt_len)]
            seq.token_ids += keep
            seq.num_computed_tokens += min(len(keep), len(tokens) - 1)  # the accepted draft tokens
            self._computed(seq)
            if stop is not None and stop <= len(keep):
                self.finish(seq, "stop")
            elif seq.num_tokens - seq.prompt_len >= seq.params.max_tokens:
                self.finish(seq, "length")
        return advanced

    def _computed(self, seq: Sequence) -> None:
        """After a step computed some of seq's tokens: name its full blocks for the prefix cache and, with a
        window on every layer, give back the blocks behind it (the next query sits at num_computed_tokens)."""
        if seq.num_computed_tokens // self.block_manager.block_size > seq.num_hashed_blocks:  # a block filled
            self.block_manager.cache_blocks(seq)
        if self.window is not None:
            self.block_manager.release_before(seq, seq.num_computed_tokens - self.window + 1)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End a sequence now (stop, length, a stop string found by the engine, or abort) and free its blocks."""
        if seq.finished:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status, seq.finish_reason = Status.FINISHED, reason

    def abort(self, seq: Sequence) -> None:
        self.finish(seq, "abort")
