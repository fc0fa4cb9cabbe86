"""One sequence being served, and what the engine reports about it after each step.

A sequence's state is its tokens (prompt, then output) and how many of them are already in the KV cache
(`num_computed_tokens`). There is no separate prefill or decode phase: each step computes some of the tokens
not yet computed (the whole remaining prompt, a chunk of it, or the one token sampled last), and when the
computed tokens catch up with all tokens, the last position's logits give the next token.
"""

from __future__ import annotations

import enum
import itertools
import time
from collections.abc import Collection, Hashable
from dataclasses import dataclass, field

import torch

from lmforge.infer.sampling import SamplingParams, StopStrings, TokenLogprob
from lmforge.tokenizer import IncrementalDecoder


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_ids = itertools.count()


class Sequence:
    """One output stream of a request (a request with n > 1 has n sequences sharing its prompt).

    Attributes set by the block manager: block_table (ids of the pool blocks holding this sequence's keys and
    values, in order) and num_hashed_blocks (how many of them are named in the prefix cache).
    """

    def __init__(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        eos_id: int | Collection[int] | None = None,
        adapter: str | None = None,
        adapter_salt: int | None = None,
    ):
        self.seq_id = next(_seq_ids)  # also the arrival order: lower ids are older
        self.request_id, self.index, self.params = request_id, index, params
        self.token_ids = list(prompt_ids)
        self.prompt_len = len(prompt_ids)
        # Tokens that end the output (not part of it): the stop_token_ids, and the EOS token(s) unless ignore_eos.
        ends = frozenset() if eos_id is None else frozenset([eos_id] if isinstance(eos_id, int) else eos_id)
        self.stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else ends)
        self.adapter = adapter  # the LoRA adapter its forwards use (lmforge.infer.multi_lora), None: the base
        self.adapter_salt = adapter_salt  # the adapter's load: keeps prefix-cache blocks of adapters apart
        self.status = Status.WAITING
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.num_computed_tokens = 0
        self.num_draft_computed = 0  # tokens in a draft model's KV cache (speculative decoding; lmforge.engine.drafter)
        self.lookup: object | None = None  # prompt lookup's index and record for it (lmforge.engine.drafter), if used
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache at the last admission
        self.block_table: list[int] = []
        self.num_hashed_blocks = 0
        self.cache_salt: str | None = None  # "long": its keys turn by LongRoPE's long factors (a hash chain of its own)
        self.generator: torch.Generator | None = None  # of a sampled (non-greedy) sequence; set by the engine
        self.stops: StopStrings | None = None  # over the decoded output, when the engine has a tokenizer
        self.decoder: IncrementalDecoder | None = None  # the output's text, a few tokens decoded a step
        self.num_emitted = 0  # output tokens already reported in a RequestOutput
        self.arrival_time = time.perf_counter()
        self.token_times: list[float] = []  # when each output token was chosen (TTFT, inter-token latency)

    @property
    def prefix_salt(self) -> Hashable | None:
        """What starts its prefix-cache hash chain (BlockManager.root): its LongRoPE salt (None: the base model's
        keys, computed the one way), paired with its adapter's load where it has one."""
        return self.cache_salt if self.adapter_salt is None else (self.cache_salt, self.adapter_salt)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_to_compute(self) -> int:
        """Tokens not yet in the KV cache: the remaining prompt while prefilling, 1 while decoding."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}#{self.index}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={self.block_table})"
        )


@dataclass
class RequestOutput:
    """What one step produced for one sequence: the new tokens and text, and on its last output why it ended."""

    request_id: str
    index: int  # which of the request's n samples
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""  # newly printable text ("" without a tokenizer)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" on the last output, else None
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served
    metrics: dict | None = None  # on the last output: ttft_s, mean inter-token latency, tokens
    error: Exception | None = None  # with finish_reason "error": what failed this request (and only it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
