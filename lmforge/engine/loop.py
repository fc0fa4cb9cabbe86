"""Serving the engine from a background thread: each request's outputs arrive on its own stream.

`EngineLoop` runs `Engine.step()` in a thread and hands each request's outputs to its own `RequestStream`
(iterate it, or `async for` it); `abort` frees the request's blocks at the next step boundary. Adds and aborts
are queued and applied between steps, so a server thread never waits for a step to finish.

The engine's thread computes and nothing else. Text is made where a stream is read: each sequence's tokens are
decoded and searched for stop strings by its consumer (an event loop, a caller's thread), and a stop string found
there ends the sequence in the engine through a command (`Engine.stop`); the text is the same as the engine's
own detokenization gives. Outputs reach an event loop in one hand-off per step (one call_soon_threadsafe for all
of that loop's streams), not one per token per stream: a step of 64 rows wakes the server once.

Other work on the engine's thread (`call`: loading a LoRA adapter, embedding a batch of texts) is queued the same
way and runs between steps, one call per step at most, so it never holds up decoding for longer than it takes.

Failures: a request that fails inside a step fails alone (`Engine.step` gives its sequences a final output with
finish_reason "error" and the exception; its stream ends there). Should a step fail as a whole (a fault no single
request can be blamed for), every request in flight ends that way and the loop takes new requests; only when even
that fails does the loop stop (`error` set, every open stream ends with the exception).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq

from lmforge.engine.engine import Engine
from lmforge.engine.sequence import RequestOutput
from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams, StopStrings
from lmforge.tokenizer import IncrementalDecoder

log = logging.getLogger("lmforge.engine")

STATS_EVERY_S = 0.05  # how fresh last_stats is kept while the engine is busy
_INTERRUPT = object()  # ends an async stream's iteration early (RequestStream.interrupt)


class OutputText:
    """One sequence's text, made by its consumer: the output so far decoded, stop strings searched in it.

    `apply` fills an output's `text` with what is newly safe to show, exactly as the engine's own detokenization
    does (lmforge.infer.sampling.StopStrings over the whole decoded output), decoding only the new tokens
    (lmforge.tokenizer.IncrementalDecoder: a step costs the same at the 500th token as at the 5th). A stop string
    ends the output there: finish_reason "stop", the metrics of the tokens kept (timed as they reach the reader);
    the engine is told to stop the sequence and the outputs it made meanwhile are dropped (`ended`).
    """

    def __init__(self, tokenizer, stop: Seq[str], arrival_time: float):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopStrings(list(stop))
        self.arrival_time = arrival_time
        self.token_times: list[float] = []
        self.ended = False

    def apply(self, out: RequestOutput) -> bool:
        """Fill out.text; True when a stop string ended the sequence with this output."""
        self.token_times += [time.perf_counter()] * len(out.new_token_ids)
        text = self.decoder.push(out.new_token_ids, final=out.finished)
        out.text = self.stops.update(text, final=out.finished)
        self.ended = out.finished
        if not self.stops.stopped or out.finished:
            return False
        out.finish_reason, self.ended = "stop", True
        t = self.token_times[: len(self.decoder.ids)]
        out.metrics = dict(
            output_tokens=len(t),
            ttft_s=t[0] - self.arrival_time if t else None,
            itl_s=(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None,
        )
        return True


class RequestStream:
    """One request's outputs as the engine produces them: `for out in stream` blocks, `async for` awaits.

    The engine thread puts each RequestOutput, then None after the request's last one (or an exception if the
    engine failed). A stream made inside a running asyncio loop is fed through that loop, so awaiting it never
    blocks the loop or needs a thread per request. With `texts` (one OutputText per sequence) the reader makes
    the text; `on_stop(request_id, index)` is called when a stop string ends a sequence.
    """

    def __init__(
        self,
        request_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
        texts: list[OutputText] | None = None,
        on_stop: Callable[[str, int], None] | None = None,
    ):
        self.request_id, self._loop, self._texts, self._on_stop = request_id, loop, texts, on_stop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()

    def put(self, item) -> None:
        """From any thread (one item; EngineLoop hands a step's items to a loop together)."""
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    def interrupt(self) -> None:
        """End an `async for` over this stream now (from its event loop's thread: a client went away)."""
        self._queue.put_nowait(_INTERRUPT)

    def _take(self, item) -> RequestOutput | None:
        """The output to hand out for `item` (None: dropped, a sequence a stop string already ended)."""
        if item is None or item is _INTERRUPT:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        if self._texts is None or item.error is not None:
            return item
        text = self._texts[item.index]
        if text.ended:
            return None
        if text.apply(item) and self._on_stop is not None:
            self._on_stop(self.request_id, item.index)
        return item

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was made inside an asyncio loop; use `async for`")
        try:
            while True:
                out = self._take(self._queue.get())
                if out is not None:
                    yield out
        except StopIteration:
            return

    def __aiter__(self):
        if self._loop is None:
            raise TypeError("this stream was made outside an asyncio loop; use a plain `for`")
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            while True:
                out = self._take(await self._queue.get())
                if out is not None:
                    return out
        except StopIteration:
            raise StopAsyncIteration from None


class EngineStopped(RuntimeError):
    """The engine loop has stopped (closed, or its thread died): no request can run on it any more."""


def _put_all(items: list) -> None:
    """On an event loop's thread: a step's items into their streams' queues."""
    for q, item in items:
        q.put_nowait(item)


def running_loop() -> asyncio.AbstractEventLoop | None:
    """The caller's running event loop, which a stream made now is fed through (None: a plain thread)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def hand_over(items: list) -> None:
    """Put (stream, item) pairs: each event loop gets all of its streams' items in one call_soon_threadsafe,
    a thread's stream each at once."""
    by_loop: dict[asyncio.AbstractEventLoop, list] = {}
    for stream, item in items:
        if stream._loop is None:
            stream.put(item)
        else:
            by_loop.setdefault(stream._loop, []).append((stream._queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that event loop is closed: nobody is listening any more
            pass


class EngineLoop:
    """Runs `Engine.step()` in a background thread while there is work; submit and abort from any thread.

    Requests and aborts are queued as commands and applied between steps, so callers (an asyncio server) never
    wait for a step; an abort frees the request's KV blocks before the next step runs.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        engine.detokenize = engine.tokenizer is None  # with a tokenizer, the streams' readers make the text
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._calls: deque[tuple[Callable[[Engine], object], concurrent.futures.Future]] = deque()
        self._closed = False
        self.error: BaseException | None = None  # what stopped the loop thread, if it failed
        self.last_stats = engine.stats()  # refreshed after steps and commands, safe to read from any thread
        self._stats_time = 0.0
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """Queue a request (checked here, so bad input raises in the caller) and return its output stream;
        `adapter` names a LoRA adapter of the engine's (None: the base model)."""
        if not self.alive:
            raise EngineStopped(f"the engine loop has stopped ({self.error or 'closed'}); start a new one")
        seqs = self.engine.make_request(prompt_ids, params, request_id or uuid.uuid4().hex, adapter)
        loop = running_loop()
        tokenizer = self.engine.tokenizer
        texts = None if tokenizer is None else [OutputText(tokenizer, s.params.stop, s.arrival_time) for s in seqs]
        stream = RequestStream(seqs[0].request_id, loop, texts, self.stop)
        self._command("add", seqs, stream)
        if self.error is not None:  # it died meanwhile, perhaps before it could take the command (a second
            # EngineStopped for a stream it did take is never read: the first ends the stream)
            self._hand_over([(stream, EngineStopped(f"the engine stopped: {type(self.error).__name__}"))])
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request: its stream ends with finish_reason "abort" and its blocks are freed."""
        self._command("abort", request_id)

    @property
    def alive(self) -> bool:
        """Whether the loop takes requests: not closed, its thread running, no error that stopped it."""
        return not self._closed and self.error is None and self._thread.is_alive()

    def stop(self, request_id: str, index: int) -> None:
        """End one sequence of a request: its reader found a stop string (its blocks are freed before the next
        step)."""
        self._command("stop", request_id, index)

    def call(self, fn: Callable[..., object], *args) -> concurrent.futures.Future:
        """Run fn(engine, *args) on the engine's thread between two steps; its result or exception comes in the
        future (`asyncio.wrap_future` awaits it). fn is a module-level function and args plain data, so that the
        same call reaches an engine in another process (lmforge.engine.remote)."""
        if not self.alive:
            raise EngineStopped(f"the engine loop has stopped ({self.error or 'closed'}); start a new one")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._command("call", (lambda engine: fn(engine, *args)) if args else fn, future)
        return future

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()
        while not self._commands.empty():  # calls nobody will run: their callers stop waiting
            kind, *args = self._commands.get()
            if kind == "call":
                args[1].cancel()
        for _, future in self._calls:
            future.cancel()

    def __enter__(self) -> EngineLoop:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _command(self, *cmd) -> None:
        self._commands.put(cmd)
        self._wake.set()

    def _apply_commands(self) -> None:
        applied = False
        while not self._commands.empty():
            kind, *args = self._commands.get()
            applied = True
            if kind == "add":
                seqs, stream = args
                try:
                    self.engine.enqueue(seqs)
                except LmforgeError as e:  # its adapter was unloaded after the request was checked
                    stream.put(RequestOutput(stream.request_id, 0, finish_reason="error", error=e))
                    stream.put(None)
                    continue
                self._streams[stream.request_id] = stream
            elif kind == "stop":
                if self.engine.stop(*args) and args[0] in self._streams:
                    self._hand_over([(self._streams.pop(args[0]), None)])
            elif kind == "call":
                self._calls.append((args[0], args[1]))
            else:
                self._deliver(self.engine.abort(args[0]))
        if applied:  # an abort frees blocks even when no step follows
            self._publish(self.engine.stats())

    def _deliver(self, outs: list[RequestOutput]) -> None:
        items: list[tuple[RequestStream, object]] = [
            (self._streams[out.request_id], out) for out in outs if out.request_id in self._streams
        ]
        # A request's stream ends after all of this step's outputs: its n samples may finish together.
        for request_id in dict.fromkeys(out.request_id for out in outs):
            if request_id not in self.engine.requests and request_id in self._streams:
                items.append((self._streams.pop(request_id), None))
        self._hand_over(items)

    def _stats_due(self) -> dict | None:
        """The engine's stats after a step: at most every STATS_EVERY_S while it is busy (they hold medians of the
        last thousand latencies, a tenth of a small model's step), always once it is idle."""
        now = time.perf_counter()
        if now - self._stats_time < STATS_EVERY_S and self.engine.has_unfinished():
            return None
        self._stats_time = now
        return self.engine.stats()

    def _publish(self, stats: dict | None) -> None:
        """The engine's stats after a step (None: unchanged) or a command (an engine in another process sends
        them with the step's outputs)."""
        if stats is not None:
            self.last_stats = stats

    def _hand_over(self, items: list) -> None:
        hand_over(items)

    def _run_call(self) -> None:
        """The oldest queued call, if any (one between two steps: decoding goes on between them)."""
        if not self._calls:
            return
        fn, future = self._calls.popleft()
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(self.engine))
        except Exception as e:  # the caller's failure, not the engine's
            future.set_exception(e)
        self._publish(self.engine.stats())

    def _run(self) -> None:
        try:
            while not self._closed:
                self._apply_commands()
                self._run_call()
                if not self.engine.has_unfinished():
                    if not self._calls:
                        self._wake.wait()
                        self._wake.clear()
                    continue
                try:
                    outs = self.engine.step()
                except Exception as e:  # not one request's fault (Engine.step isolates those): end all in flight
                    log.exception("an engine step failed; every request in flight ends with the error")
                    outs = self.engine.fail_all(e)
                self._deliver(outs)
                self._publish(self._stats_due())
        except BaseException as e:  # the engine cannot even end its requests (or the thread is being torn down):
            # stop, ending every open stream and every one still queued with the error, so no reader waits forever
            self.error = e
            stopped = EngineStopped(f"the engine stopped: {type(e).__name__}: {e}")
            queued = []
            while not self._commands.empty():
                kind, *args = self._commands.get()
                if kind == "add":
                    queued.append(args[1])
                elif kind == "call":
                    self._calls.append((args[0], args[1]))
            self._hand_over([(stream, stopped) for stream in [*self._streams.values(), *queued]])
            self._streams.clear()
            for _, future in self._calls:
                future.set_exception(stopped)
            raise
