"""From engine outputs to OpenAI's answers, whole or streamed as server-sent events ending in `data: [DONE]`.

`engine_outputs` merges a request's engine streams (one per prompt) in arrival order and stops when the client
goes away. `Reply` is what /v1/completions and /v1/chat/completions share: it numbers the choices (prompt i's
sample j is choice i * n + j), counts tokens for `usage` and the API key, and either accumulates each choice's
text, logprobs and finish reason into one JSON answer or sends them as chunks. What differs between the two
endpoints -- field names, the chat stream's opening role chunk and separate finish chunk, echo, the logprobs
format -- is a `Shape` (CompletionShape, ChatShape).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from lmforge.engine.loop import RequestStream
from lmforge.engine.sequence import RequestOutput
from lmforge.serve.errors import ApiError
from lmforge.serve.server import engine_unavailable


def sse(obj) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is closed when the client goes away, so its request is aborted.

    Starlette cancels a streaming response on disconnect but leaves the generator suspended (closed only when
    garbage collected); closing it here runs its `finally`, which aborts the engine request at once. The slot
    is released here too, so a response that never started streaming does not keep its place.
    """

    def __init__(self, content, slot):
        super().__init__(content, media_type="text/event-stream")
        self.slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.slot.release()


async def engine_outputs(
    server, streams: list[RequestStream], http: Request
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, RequestOutput) as the engine produces them; ends early when the client disconnects. An
    output carrying the engine's error for this request raises it as an ApiError (streaming sends it as an event).
    One prompt's stream is read as it is; several are merged by one task each."""

    async def watch() -> None:  # a client that goes away stops its request (its slot's release aborts it)
        while not await http.is_disconnected():
            await asyncio.sleep(0.25)
        for stream in streams:
            stream.interrupt()

    def check(out: RequestOutput) -> RequestOutput:
        if out.error is not None:  # this request failed in the engine, alone: a 400 if its input is at fault
            server.metrics.request_errors.inc()
            raise ApiError.of(out.error)
        server.metrics.observe(out)
        return out

    async def merged_outputs() -> AsyncIterator[tuple[int, RequestOutput]]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    merged.put_nowait((i, out))
            except Exception as e:  # the engine failed: surface it to the request
                merged.put_nowait((i, e))
            merged.put_nowait((i, None))

        pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
        open_streams = len(streams)
        try:
            while open_streams:
                i, out = await merged.get()
                if out is None:
                    open_streams -= 1
                elif isinstance(out, Exception):
                    raise out
                else:
                    yield i, out
        finally:
            for t in pumps:
                t.cancel()

    async def single_output() -> AsyncIterator[tuple[int, RequestOutput]]:
        async for out in streams[0]:
            yield 0, out

    watcher = asyncio.create_task(watch())
    try:
        async with contextlib.aclosing(single_output() if len(streams) == 1 else merged_outputs()) as outs:
            try:
                async for i, out in outs:
                    yield i, check(out)
            except ApiError:
                raise
            except Exception as e:  # the engine loop itself stopped
                raise engine_unavailable(e) from e
    finally:
        watcher.cancel()


def finish_reason(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


# ---------------------------------------------------------------------------------- the two shapes


class CompletionShape:
    """/v1/completions: `text` per choice, the prompt echoed before a choice's first text, logprobs with offsets."""

    whole_object = chunk_object = "text_completion"

    def __init__(self, server, echo: list[str] | None = None):
        self.server, self.echo, self.echoed = server, echo, set()

    def text(self, prompt_index: int, index: int, out: RequestOutput) -> str:
        if self.echo and index not in self.echoed:
            self.echoed.add(index)
            return self.echo[prompt_index] + out.text
        return out.text

    def logprobs(self, lps) -> dict:
        tokens, token_lps, tops, offsets, offset = [], [], [], [], 0
        for lp in lps:
            text = self.server.token_text(lp.token)
            tokens.append(text), token_lps.append(lp.logprob), offsets.append(offset)
            tops.append({self.server.token_text(t): v for t, v in lp.top.items()})
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    def opening(self, num_choices: int) -> list[list[dict]]:
        return []

    def chunks(self, index: int, text: str, lp: dict | None, finish: str | None) -> list[list[dict]]:
        return (
            [[{"index": index, "text": text, "logprobs": lp, "finish_reason": finish}]] if text or finish or lp else []
        )

    def choice(self, index: int) -> dict:
        return {"index": index, "text": "", "logprobs": None, "finish_reason": None}

    def add(self, choice: dict, text: str, lp: dict | None) -> None:
        choice["text"] += text
        if lp:
            old = choice["logprobs"]
            choice["logprobs"] = lp if old is None else {k: old[k] + lp[k] for k in lp}

    def close(self, choice: dict) -> None:
        """Text offsets run over the whole completion, not each piece."""
        if choice["logprobs"]:
            offsets, offset = [], 0
            for t in choice["logprobs"]["tokens"]:
                offsets.append(offset)
                offset += len(t)
            choice["logprobs"]["text_offset"] = offsets


class ChatShape:
    """/v1/chat/completions: an assistant `message` per choice; streams open with the role, end with a finish chunk."""

    whole_object, chunk_object = "chat.completion", "chat.completion.chunk"

    def __init__(self, server):
        self.server = server

    def text(self, prompt_index: int, index: int, out: RequestOutput) -> str:
        return out.text

    def logprobs(self, lps) -> dict:
        def entry(token: int, logprob: float) -> dict:
            return {
                "token": self.server.token_text(token),
                "logprob": logprob,
                "bytes": list(self.server.token_bytes(token)),
            }

        return {
            "content": [
                dict(entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top.items()]) for lp in lps
            ],
            "refusal": None,
        }

    def opening(self, num_choices: int) -> list[list[dict]]:
        return [
            [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]
            for j in range(num_choices)
        ]

    def chunks(self, index: int, text: str, lp: dict | None, finish: str | None) -> list[list[dict]]:
        out = (
            [[{"index": index, "delta": {"content": text}, "logprobs": lp, "finish_reason": None}]]
            if text or lp
            else []
        )
        if finish:
            out.append([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}])
        return out

    def choice(self, index: int) -> dict:
        return {
            "index": index,
            "message": {"role": "assistant", "content": "", "refusal": None},
            "logprobs": None,
            "finish_reason": None,
        }

    def add(self, choice: dict, text: str, lp: dict | None) -> None:
        choice["message"]["content"] += text
        if lp:
            old = choice["logprobs"]
            choice["logprobs"] = lp if old is None else {"content": old["content"] + lp["content"], "refusal": None}

    def close(self, choice: dict) -> None:
        pass


# ---------------------------------------------------------------------------------- one request's answer


class Reply:
    """One generation request's answer, from its engine streams to OpenAI's JSON (`whole`) or events (`stream`).

    Args:
        server: the Server (metrics, token spelling, the model's name).
        http: the HTTP request (to notice a disconnect).
        shape: CompletionShape or ChatShape.
        streams: one engine stream per prompt.
        slot: the request's admission slot (its token count is kept up to date; released at the end).
        n: samples per prompt.
        prompt_tokens: the prompts' tokens, for `usage`.
        guard: the request's --controls / banned-phrases guard (its fire counts go in an `lmforge` field), or None.
        constraint: the request's output format (structured.TokenConstraint), or None. An answer that stops
            before its format is complete (banned phrases left the format no way on, so the end token was forced)
            finishes with "content_filter" rather than "stop", so "stop" always means a complete, valid answer.
        model: the name the answer reports (a LoRA adapter's, when the request named one); default: the model's.
    """

    def __init__(
        self,
        server,
        http: Request,
        shape,
        streams: list[RequestStream],
        slot,
        n: int,
        prompt_tokens: int,
        guard=None,
        constraint=None,
        model: str | None = None,
    ):
        self.server, self.http, self.shape, self.streams, self.slot = server, http, shape, streams, slot
        self.model = model or server.settings.model_name
        self.n, self.prompt_tokens, self.guard, self.constraint = n, prompt_tokens, guard, constraint
        self.outputs: dict[int, list[int]] = {}  # choice -> its tokens, to check a constrained answer ended whole
        self.id = f"{'chatcmpl' if isinstance(shape, ChatShape) else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.completion_tokens = 0
        slot.tokens = prompt_tokens

    def chunk(self, choices: list[dict], usage: dict | None = None, whole: bool = False) -> dict:
        return {
            "id": self.id,
            "object": self.shape.whole_object if whole else self.shape.chunk_object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    def usage(self) -> dict:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def extra(self) -> dict:
        """The lmforge-only field: how often each --controls entry fired for this request (so far, on a stream's
        finish chunks). Clients of the OpenAI API ignore unknown fields; openai's objects keep it in
        `model_extra`."""
        return {"lmforge": {"controls": self.guard.counts()}} if self.guard is not None else {}

    async def pieces(self) -> AsyncIterator[tuple[int, str, dict | None, str | None]]:
        """(choice index, text, logprobs, finish reason) for every engine output, as they come."""
        async with contextlib.aclosing(engine_outputs(self.server, self.streams, self.http)) as outs:
            async for i, out in outs:
                index = i * self.n + out.index
                self.completion_tokens += len(out.new_token_ids)
                self.slot.tokens += len(out.new_token_ids)
                lp = self.shape.logprobs(out.logprobs) if out.logprobs else None
                finish = finish_reason(out.finish_reason)
                if self.constraint is not None:
                    tokens = self.outputs.setdefault(index, [])
                    tokens += out.new_token_ids
                    if finish == "stop" and not self.constraint.is_complete(tokens):
                        finish = "content_filter"
                yield index, self.shape.text(i, index, out), lp, finish

    async def whole(self) -> dict:
        choices = [self.shape.choice(i) for i in range(len(self.streams) * self.n)]
        try:
            async with contextlib.aclosing(self.pieces()) as pieces:
                async for index, text, lp, finish in pieces:
                    self.shape.add(choices[index], text, lp)
                    choices[index]["finish_reason"] = finish
        finally:
            self.slot.release()
        for c in choices:
            self.shape.close(c)
        return self.chunk(choices, self.usage(), whole=True) | self.extra()

    def stream(self, include_usage: bool) -> SSEResponse:
        async def events():
            for choices in self.shape.opening(len(self.streams) * self.n):
                yield sse(self.chunk(choices))
            async with contextlib.aclosing(self.pieces()) as pieces:
                try:
                    async for index, text, lp, finish in pieces:
                        for choices in self.shape.chunks(index, text, lp, finish):
                            yield sse(self.chunk(choices) | (self.extra() if choices[0]["finish_reason"] else {}))
                except ApiError as e:  # after the 200 went out, an error can only be an event
                    yield sse(e.body())
                    return
            if include_usage:
                yield sse(self.chunk([], self.usage()))
            yield "data: [DONE]\n\n"

        return SSEResponse(events(), self.slot)
