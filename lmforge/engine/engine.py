"""The serving engine: schedule -> execute -> update, one step at a time (lmforge.engine.loop serves it from a thread).

`Engine.step()` asks the scheduler which sequences run and how many tokens each computes, runs the model over
them with the paged KV cache, chooses the next token of every sequence that caught up with its tokens (with
lmforge.infer.sampling, per-row settings and per-request RNG), and lets the scheduler record the tokens, stop
finished sequences and free their blocks.

Execution: a step runs at most two forwards: all decoding rows (one new token each) batched, and all prefill
chunks batched, right-padded to the longest chunk. Padding decodes up to a chunk's length would waste up to
chunk x rows of compute; one forward per chunk instead was 5.6x slower than one padded forward for 32 prompts of
32 tokens (fp32, 2 shared cores), because small matrix products use the CPU poorly. Forwards go through
lmforge.engine.forward: decoding rows, draft steps and speculative checks take the fused step where the model has
one.

Speculative decoding (a `draft` model, or `speculative="ngram"`: prompt lookup): the proposer
(lmforge.engine.drafter) proposes up to k tokens for every decoding row, the target checks all of them in one
forward over [last token, drafts] per row, and lmforge.infer.speculative's accept/reject rule keeps a prefix and
adds one token of the target's, so each row gains 1 to k + 1 tokens per step with the target's distribution
(greedy: exactly plain greedy's tokens). A row with no proposal (prompt lookup found no match) joins the plain
decoding rows: it costs what an ordinary decode costs. Rows whose request asks for logprobs get them from the
target's logits at each kept token.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from collections import deque
from collections.abc import Sequence as Seq

import torch

from lmforge.engine import forward
from lmforge.engine.block_manager import BlockManager
from lmforge.engine.drafter import Drafter, NgramProposer
from lmforge.engine.paged_cache import PagedKVCache
from lmforge.engine.scheduler import Scheduler, SchedulerOutput
from lmforge.engine.sequence import RequestOutput, Sequence
from lmforge.errors import LmforgeError
from lmforge.infer.generate import Completion, check_prompt, end_tokens, per_prompt_params
from lmforge.infer.multi_lora import AdapterBank, AdapterError, LoRABatch
from lmforge.infer.sampling import SamplingParams, StopStrings, make_generator, sample_next, token_logprobs
from lmforge.infer.speculative import SpeculativeError, accept_greedy, accept_reject, processed, token_probs
from lmforge.rope import long_rope_switch
from lmforge.tokenizer import IncrementalDecoder

log = logging.getLogger("lmforge.engine")


class RequestError(LmforgeError):
    """A request the engine's KV pool cannot take (infer.generate.check_prompt refuses the rest); `param` names
    the request field at fault."""


def check_request(
    prompt_ids: Seq[int], params: SamplingParams, config, *, has_tokenizer: bool, num_blocks: int, block_size: int
) -> list[int]:
    """The prompt as a list, once the request is known to fit an engine with these limits (RequestError, or
    check_prompt's error, naming the field otherwise): what `Engine.make_request` checks, and what a server checks
    before it sends a request to an engine in another process (lmforge.engine.remote)."""
    prompt = check_prompt(prompt_ids, params, config, has_tokenizer=has_tokenizer)
    need = len(prompt) + params.max_tokens - 1  # positions fed to the model
    blocks = -(-need // block_size)
    if blocks > num_blocks:
        raise RequestError(
            f"the request needs {blocks} KV blocks but the pool has {num_blocks}; raise num_blocks or lower max_tokens",
            "max_tokens",
        )
    return prompt


class Engine:
    """Continuous batching over one model.

    Args:
        model: an lmforge `Transformer` (anything with `hidden`, `logits`, `config` and the cache protocol);
            prepared by `lmforge.infer.fused.prepare_for_decoding`, its decoding rows take the fused step.
        tokenizer: decodes text and enables stop strings; its end tokens (`eos_id` and `end_ids`) end outputs
            unless ignore_eos.
        num_blocks: KV blocks in the pool; default: room for max_num_seqs full-context sequences.
        block_size: token slots per KV block.
        max_num_seqs: the most sequences running at once.
        max_num_batched_tokens: the per-step token budget (decodes take 1, prompts are chunked to fit).
        eos_id: the end-of-sequence token (or tokens) without a tokenizer (or to override its).
        draft: a smaller model sharing the tokenizer: speculative decoding of every decoding row.
        speculative: "ngram" drafts by prompt lookup (no draft model); None: speculate with `draft` if given.
        num_speculative_tokens: tokens the draft (or prompt lookup, at most) proposes per row and step.
        prompt_lookup_min, prompt_lookup_max: the n-gram sizes prompt lookup matches, longest first.
        kv_dtype: the KV pool's dtype (default: the model's). float16 under a float32 model holds twice the tokens
            in the same memory and halves what attention reads (lmforge.engine.paged_cache); the fused step
            reads it too.
        adapters: LoRA adapters served beside the unmerged model (lmforge.infer.multi_lora.AdapterBank on this
            model): a request names one (`adapter=`), and rows of different adapters share every step.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        num_blocks: int | None = None,
        block_size: int = 16,
        max_num_seqs: int = 32,
        max_num_batched_tokens: int = 256,
        eos_id: int | Seq[int] | None = None,
        draft=None,
        speculative: str | None = None,
        num_speculative_tokens: int = 4,
        prompt_lookup_min: int = 2,
        prompt_lookup_max: int = 4,
        kv_dtype: torch.dtype | None = None,
        adapters: AdapterBank | None = None,
    ):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, model.config
        if adapters is not None and adapters.model is not model:
            raise AdapterError("the adapter bank was made for another model: make it with AdapterBank(model)")
        self.adapters = adapters
        p = next(model.parameters())
        self.device = p.device
        if num_blocks is None:
            num_blocks = max_num_seqs * -(-self.config.block_size // block_size)
        self.cache = PagedKVCache(self.config, num_blocks, block_size, dtype=kv_dtype or p.dtype, device=p.device)
        fused = getattr(model, "fused_decoder", None)  # lmforge.infer.fused: what short feeds take (engine.forward)
        self.fused = fused if fused is not None and fused.accepts(self.cache) else None
        self.block_manager = BlockManager(num_blocks, block_size)
        if speculative not in (None, "ngram") or (speculative == "ngram" and draft is not None):
            raise SpeculativeError(
                f"speculative={speculative!r}: choose 'ngram' (prompt lookup, no draft model) or "
                f"None (speculate with the draft model, when one is given)"
            )
        self.drafter = (
            NgramProposer(self.config.vocab_size, num_speculative_tokens, prompt_lookup_min, prompt_lookup_max)
            if speculative == "ngram"
            else Drafter(draft, self.config, num_blocks, block_size, num_speculative_tokens)
            if draft is not None
            else None
        )
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs,
            max_num_batched_tokens,
            num_speculative_tokens if self.drafter is not None else 0,
            recompute_at=long_rope_switch(self.config),
            window=self.config.sliding_window if self.config.all_windowed and draft is None else None,
            proposes=self.drafter.lookahead if self.drafter is not None else None,
        )  # a draft model reads the same blocks without a window
        self.eos_ids = end_tokens(tokenizer, eos_id)
        # Whether step() decodes text and finds stop strings itself; a consumer that does both off the engine's
        # thread (lmforge.engine.loop's streams) turns it off and ends sequences by their stop strings with `stop`.
        self.detokenize = True
        self.requests: dict[str, list[Sequence]] = {}  # live requests -> their sequences
        self.counters = dict(
            prompt_tokens=0, generated_tokens=0, computed_tokens=0, steps=0, draft_proposed=0, draft_accepted=0
        )
        self.ttft_s: deque[float] = deque(maxlen=1000)  # of recently finished requests
        self.itl_s: deque[float] = deque(maxlen=1000)

    # ---- requests ------------------------------------------------------------------------------
    def make_request(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> list[Sequence]:
        """Check a request and build its sequences (n per prompt), without queueing them. `adapter` names a LoRA
        adapter of `self.adapters` (None: the base model)."""
        params = params if params is not None else SamplingParams()
        prompt = check_request(
            prompt_ids,
            params,
            self.config,
            has_tokenizer=self.tokenizer is not None,
            num_blocks=self.block_manager.num_blocks,
            block_size=self.block_manager.block_size,
        )
        salt = self._check_adapter(adapter)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        seqs = []
        for i in range(params.n):
            seq = Sequence(request_id, prompt, params, i, self.eos_ids, adapter, salt)
            seq.generator = None if params.greedy else make_generator(params.seed, i, self.device)
            if self.tokenizer is not None and self.detokenize:  # (a loop whose streams make the text: not here)
                seq.stops, seq.decoder = StopStrings(params.stop), IncrementalDecoder(self.tokenizer)
            seqs.append(seq)
        return seqs

    def _check_adapter(self, name: str | None) -> int | None:
        """The prefix-cache salt of a loaded adapter (None for the base); AdapterError names an unknown one."""
        if name is None:
            return None
        if self.adapters is None or name not in self.adapters.adapters:
            loaded = ", ".join(self.adapters.adapters) if self.adapters is not None else ""
            raise AdapterError(
                f"no LoRA adapter named {name!r} is loaded" + (f" (loaded: {loaded})" if loaded else ""),
                param="adapter",
            )
        return self.adapters.ids[name]

    def remove_adapter(self, name: str) -> None:
        """Stop serving an adapter; refused while a request uses it (between steps: the engine loop's thread)."""
        users = sum(1 for seqs in self.requests.values() for s in seqs if s.adapter == name and not s.finished)
        if users:
            raise AdapterError(
                f"adapter {name!r} is in use by {users} running request(s); unload it when they end", param="name"
            )
        if self.adapters is None:
            raise AdapterError(f"no LoRA adapter named {name!r} is loaded", param="name")
        self.adapters.remove(name)

    def _lora(self, seqs) -> LoRABatch | None:
        """Each row's adapter for a forward over `seqs` (None when all are the base)."""
        return self.adapters.batch([s.adapter for s in seqs]) if self.adapters is not None else None

    def enqueue(self, seqs: list[Sequence]) -> str:
        if seqs[0].adapter_salt != self._check_adapter(seqs[0].adapter):  # unloaded (and maybe reloaded) meanwhile
            raise AdapterError(f"adapter {seqs[0].adapter!r} was unloaded after the request was made", param="adapter")
        self.requests[seqs[0].request_id] = seqs
        for seq in seqs:
            self.scheduler.add(seq)
        self.counters["prompt_tokens"] += seqs[0].prompt_len
        return seqs[0].request_id

    def add_request(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> str:
        """Queue a prompt; it joins the running batch at the next step with room. Returns its request id."""
        return self.enqueue(self.make_request(prompt_ids, params, request_id, adapter))

    def abort(self, request_id: str) -> list[RequestOutput]:
        """Stop a request now and free its KV blocks; returns the final output of each of its live sequences."""
        outs = []
        for seq in self.requests.pop(request_id, []):
            if not seq.finished:
                self.scheduler.abort(seq)
                outs.append(
                    RequestOutput(
                        seq.request_id,
                        seq.index,
                        finish_reason="abort",
                        num_cached_tokens=seq.num_cached_tokens,
                        metrics=self._metrics(seq),
                    )
                )
        return outs

    def stop(self, request_id: str, index: int) -> bool:
        """End one sequence of a request because its consumer found a stop string in its text (the engine does
        not decode when `detokenize` is off); frees its blocks. True when that ended the whole request. Its
        metrics go into the engine's latency figures; no output is made (the consumer already ended it)."""
        seqs = self.requests.get(request_id, [])
        for seq in seqs:
            if seq.index == index and not seq.finished:
                self.scheduler.finish(seq, "stop")
                self._metrics(seq)
        if seqs and all(s.finished for s in seqs):
            del self.requests[request_id]
            return True
        return False

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def fail(self, request_id: str, error: Exception) -> list[RequestOutput]:
        """End a request with `error`: each of its sequences gets a final output with finish_reason "error" and
        the exception, and its KV blocks are freed. The engine and every other request go on."""
        log.warning(
            "request %s failed in the engine and ends alone: %s: %s",
            request_id,
            type(error).__name__,
            error,
            exc_info=error,
        )
        outs = []
        for seq in self.requests.pop(request_id, []):
            self.scheduler.finish(seq, "error")
            outs.append(
                RequestOutput(
                    seq.request_id,
                    seq.index,
                    finish_reason="error",
                    error=error,
                    num_cached_tokens=seq.num_cached_tokens,
                    metrics=self._metrics(seq),
                )
            )
        return outs

    def fail_all(self, error: Exception) -> list[RequestOutput]:
        """End every request in flight with `error` (a failure no single request can be blamed for)."""
        return [out for request_id in list(self.requests) for out in self.fail(request_id, error)]

    # ---- one step ------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, execute, update: one forward's worth of work for the running batch. A request whose rows
        fail to compute or sample fails alone (`_execute_isolated`); the other rows' tokens stand."""
        scheduled = self.scheduler.schedule()
        sampled, logprobs, failed = self._execute_isolated(scheduled)
        failures = [out for request_id, error in failed.items() for out in self.fail(request_id, error)]
        advanced = self.scheduler.update_from_output(scheduled, sampled)
        return failures + self._outputs(advanced, logprobs)

    def _execute_isolated(self, out: SchedulerOutput) -> tuple[dict[int, list[int]], dict, dict[str, Exception]]:
        """`_execute`, and when it raises, each row again on its own: a row that fails alone is its request's
        failure (request id -> exception), the others' tokens stand. Their RNG is first rewound to where the
        step began, so a seeded request draws the same tokens as if it had not shared a step with the failure."""
        rngs = [(s.generator, s.generator.get_state()) for s, _ in out.scheduled if s.generator is not None]
        self.counters["steps"] += 1
        try:
            return *self._execute(out), {}
        except Exception as e:
            if len(out.scheduled) == 1:
                return {}, {}, {out.scheduled[0][0].request_id: e}
        for generator, state in rngs:
            generator.set_state(state)
        sampled, logprobs, failed = {}, {}, {}
        for seq, n in out.scheduled:
            if seq.request_id in failed:
                continue
            ahead = {seq.seq_id: out.lookahead[seq.seq_id]} if seq.seq_id in out.lookahead else {}
            try:
                more, more_lps = self._execute(SchedulerOutput([(seq, n)], lookahead=ahead))
            except Exception as e:
                failed[seq.request_id] = e
                continue
            sampled.update(more)
            logprobs.update(more_lps)
        return sampled, logprobs, failed

    def _execute(self, out: SchedulerOutput) -> tuple[dict[int, list[int]], dict]:
        """Run the model over the scheduled rows; choose the next token(s) of each row that caught up."""
        speculative = [(s, n) for s, n in out.scheduled if s.seq_id in out.lookahead]
        proposals = self._propose([s for s, _ in speculative], out.lookahead) if speculative else {}
        self.counters["computed_tokens"] += out.num_batched_tokens  # lookahead now: the tokens proposed
        decodes = [(s, n) for s, n in out.scheduled if n == 1 and s.seq_id not in out.lookahead]
        prefills = [(s, n) for s, n in out.scheduled if n > 1]
        if self.drafter is not None:
            self.drafter.mirror(decodes + prefills)
        logits: list[torch.Tensor] = []
        seqs: list[Sequence] = []
        sampled: dict[int, list[int]] = {}
        lps: dict = {}
        if proposals:  # the decoding rows ride along in the proposals' check: one call, not two
            riders = [s for s, n in decodes if out.samples(s, n)]
            decodes = [(s, n) for s, n in decodes if not out.samples(s, n)]
            checked = list(proposals)
            sampled, lps, rider_logits = self._speculate(
                checked, [proposals[s][0] for s in checked], [proposals[s][1] for s in checked], riders
            )
            logits, seqs = ([rider_logits], riders) if riders else ([], [])
        groups = [g for g in (decodes, prefills) if g]
        for group in groups:
            pick = [b for b, (s, n) in enumerate(group) if out.samples(s, n)]
            tables = [s.block_table for s, _ in group]
            starts = [s.num_computed_tokens for s, _ in group]
            feeds = [s.token_ids[a : a + n] for (s, n), a in zip(group, starts)]
            long = self._long_rope([s for s, _ in group])
            lora = self._lora([s for s, _ in group])
            if group is decodes:  # one token a row: the fused step where the model has one
                rows = forward.logits(self.model, self.cache, tables, feeds, starts, long_rope=long, lora=lora)
                logits += [rows if len(pick) == len(group) else rows[pick]] if pick else []
            else:  # prompt chunks: the head only where a row samples
                last = forward.hidden(self.model, self.cache, tables, feeds, starts, long, lora)[
                    torch.arange(len(group)), torch.tensor([n for _, n in group]) - 1
                ]
                if pick:  # last: (B, C)
                    logits.append(forward.head(self.model, last[pick], lora.select(pick) if lora else None))
            seqs += [group[b][0] for b in pick]
        if seqs:
            more, more_lps = self._sample(logits[0] if len(logits) == 1 else torch.cat(logits), seqs)
            sampled.update(more)
            lps.update(more_lps)
        return sampled, lps

    def _long_rope(self, seqs: list[Sequence]) -> list[bool] | None:
        """LongRoPE models: which rows turn by the long factors (their sequences are past the original context,
        whichever chunk of them a step feeds). None for other models."""
        if self.scheduler.recompute_at is None:
            return None
        return [s.cache_salt == "long" for s in seqs]

    def _propose(self, seqs: list[Sequence], lookahead: dict[int, int]) -> dict[Sequence, tuple[list[int], object]]:
        """Proposals (tokens, q) of the speculating rows; the rows that proposed nothing lose their lookahead and
        decode as plain rows in this step (no verification work for them)."""
        assert self.drafter is not None  # the scheduler looks ahead only for an engine with a proposer
        drafted, q = self.drafter.propose(seqs, [lookahead[s.seq_id] for s in seqs])
        for s, d in zip(seqs, drafted):
            if d:
                lookahead[s.seq_id] = len(d)
            else:
                del lookahead[s.seq_id]
        return {s: (d, qs) for s, d, qs in zip(seqs, drafted, q) if d}

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> tuple[dict[int, list[int]], dict]:
        """The one place tokens are chosen: lmforge.infer.sampling over rows with their own settings and RNG, all
        rows in one pass (greedy and sampled alike)."""
        params = [s.params for s in seqs]
        tokens = sample_next(
            logits, params, [s.token_ids for s in seqs], [s.prompt_len for s in seqs], [s.generator for s in seqs]
        )
        lps: dict = {}
        if any(p.logprobs is not None for p in params):
            lps = {
                s.seq_id: [lp]
                for s, lp in zip(seqs, token_logprobs(logits, tokens, [p.logprobs for p in params]))
                if lp is not None
            }
        return {s.seq_id: [t] for s, t in zip(seqs, tokens.tolist())}, lps

    def _speculate(
        self,
        seqs: list[Sequence],
        drafted: list[list[int]],
        q: list,
        riders: list[Sequence],
    ) -> tuple[dict[int, list[int]], dict, torch.Tensor]:
        """Check each row's proposal drafted[b] (drawn from q[b]) in one target forward, keep what the rule keeps;
        the same forward gives the plain decoding rows `riders` their next-token logits (returned, (J, V)).

        Rows of different lengths (proposals of any length, riders of one token) share the forward without
        padding: the fused step computes each row's own tokens (lmforge.engine.forward), as the model's own
        forward writes only real tokens' keys and values.
        """
        ks = [len(d) for d in drafted]
        feeds = [s.token_ids[-1:] + d for s, d in zip(seqs, drafted)] + [s.token_ids[-1:] for s in riders]
        rows = seqs + riders
        all_logits = forward.logits(
            self.model,
            self.cache,
            [s.block_table for s in rows],
            feeds,  # (B, T, V)
            [s.num_computed_tokens for s in rows],
            every_position=True,
            long_rope=self._long_rope(rows),
            lora=self._lora(rows),
        )
        sampled, lps = {}, {}
        for b, s in enumerate(seqs):
            logits = all_logits[b, : ks[b] + 1]  # (k + 1, V): the target after each fed token
            context, q_b = s.token_ids + drafted[b], q[b]
            if s.generator is None or q_b is None:  # greedy (the drafter keeps no distribution for it)
                new = accept_greedy(drafted[b], processed(logits, s.params, context, s.prompt_len).argmax(-1).tolist())
            else:
                new = accept_reject(drafted[b], q_b, token_probs(logits, s.params, context, s.prompt_len), s.generator)
            s.num_draft_computed = s.num_tokens + min(len(new) - 1, ks[b] - 1)
            self.counters["draft_proposed"] += ks[b]
            self.counters["draft_accepted"] += len(new) - 1
            sampled[s.seq_id] = new
            if s.params.logprobs is not None:
                lps[s.seq_id] = token_logprobs(logits[: len(new)], torch.tensor(new), [s.params.logprobs] * len(new))
        return sampled, lps, all_logits[len(seqs) :, 0]

    def _outputs(self, advanced: list[Sequence], logprobs: dict) -> list[RequestOutput]:
        """Turn each advanced sequence's new tokens into a RequestOutput; stop strings end sequences here. A
        sequence whose output cannot be made (its text fails to decode) fails its request alone."""
        now, outs, failed = time.perf_counter(), [], set()
        for seq in advanced:
            if seq.request_id in failed:
                continue
            try:
                outs.append(self._output(seq, now, logprobs.get(seq.seq_id)))
            except Exception as e:
                failed.add(seq.request_id)
                self.requests.setdefault(seq.request_id, [seq])
                outs += self.fail(seq.request_id, e)
        return outs

    def _output(self, seq: Sequence, now: float, lp: list | None) -> RequestOutput:
        """One advanced sequence's RequestOutput: its new tokens and the text now safe to show."""
        new = seq.token_ids[seq.prompt_len + seq.num_emitted :]
        seq.num_emitted += len(new)
        seq.token_times.extend([now] * len(new))
        self.counters["generated_tokens"] += len(new)
        text = ""
        if seq.stops is not None and seq.decoder is not None and self.detokenize:  # (set together)
            text = seq.stops.update(seq.decoder.push(new, final=seq.finished), final=seq.finished)
            if seq.stops.stopped and not seq.finished:
                self.scheduler.finish(seq, "stop")
        out = RequestOutput(
            seq.request_id,
            seq.index,
            new,
            text,
            lp[: len(new)] if lp is not None else None,
            seq.finish_reason,
            seq.num_cached_tokens,
        )
        if seq.finished:
            out.metrics = self._metrics(seq)
            seqs = self.requests.get(seq.request_id, [])
            if all(s.finished for s in seqs):
                self.requests.pop(seq.request_id, None)
        return out

    def _metrics(self, seq: Sequence) -> dict:
        t = seq.token_times
        m = dict(
            output_tokens=len(t),
            ttft_s=t[0] - seq.arrival_time if t else None,
            itl_s=(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
        )
        if m["ttft_s"] is not None:
            self.ttft_s.append(m["ttft_s"])
        if m["itl_s"] is not None:
            self.itl_s.append(m["itl_s"])
        return m

    # ---- reporting -----------------------------------------------------------------------------
    def stats(self) -> dict:
        """Queue and batch sizes, KV memory (blocks and bytes per live token), token counts and latencies."""
        bm, sched = self.block_manager, self.scheduler
        live = sum(s.num_computed_tokens for s in list(sched.running))
        used_bytes = bm.num_used_blocks * self.cache.bytes_per_block
        median = lambda xs: statistics.median(xs) if xs else None  # noqa: E731
        return dict(
            waiting=len(sched.waiting),
            running=len(sched.running),
            kv_blocks_total=bm.num_blocks,
            kv_blocks_used=bm.num_used_blocks,
            kv_blocks_free=bm.num_free_blocks,
            kv_blocks_cached=bm.num_cached_free_blocks,
            kv_block_bytes=self.cache.bytes_per_block,
            live_tokens=live,
            kv_bytes_per_live_token=used_bytes / live if live else None,
            kv_bytes_per_token_ideal=self.cache.bytes_per_token,
            prefix_hit_tokens=sched.num_prefix_hit_tokens,
            preemptions=sched.num_preemptions,
            ttft_s_median=median(list(self.ttft_s)),
            itl_s_median=median(list(self.itl_s)),
            **self.counters,
        )

    def generate(
        self,
        prompts: Seq[Seq[int]],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        adapters: Seq[str | None] | None = None,
    ) -> list[Completion]:
        """Run prompts to the end: one `Completion` per output (prompt-major, n each), as infer.generate does;
        adapters[i] names prompt i's LoRA adapter (None: the base)."""
        plist = per_prompt_params(params if params is not None else SamplingParams(), len(prompts))
        names = list(adapters) if adapters is not None else [None] * len(prompts)
        keys = []
        for i, (prompt, sp) in enumerate(zip(prompts, plist)):
            rid = self.add_request(prompt, sp, adapter=names[i])
            keys += [(rid, j, i) for j in range(len(self.requests[rid]))]
        text = "" if self.tokenizer is not None else None
        done = {(rid, j): Completion(i, j, text=text) for rid, j, i in keys}
        error = None
        while self.has_unfinished():
            for out in self.step():
                c = done.get((out.request_id, out.index))
                if c is None:
                    continue
                c.tokens += out.new_token_ids
                if out.logprobs:
                    c.logprobs = (c.logprobs or []) + out.logprobs
                if c.text is not None:
                    c.text += out.text
                c.finish_reason = out.finish_reason
                if out.error is not None and error is None:
                    error = out.error
        if error is not None:  # the other prompts ran to their end; this call still reports the failure
            raise error
        return [done[(rid, j)] for rid, j, _ in keys]
