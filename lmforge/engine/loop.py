"""Serving the engine from a background thread: each request's outputs arrive on its own stream.

`EngineLoop` runs `Engine.step()` in a thread and hands each request's outputs to its own `RequestStream`
(iterate it, or `async for` it); `abort` frees the request's blocks at the next step boundary. Adds and aborts
are queued and applied between steps, so a server thread never waits for a step to finish.

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
import uuid
from collections import deque
from collections.abc import Callable
from collections.abc import Sequence as Seq

from lmforge.engine.engine import Engine
from lmforge.engine.sequence import RequestOutput
from lmforge.errors import LmforgeError
from lmforge.infer.sampling import SamplingParams

log = logging.getLogger("lmforge.engine")


class RequestStream:
    """One request's outputs as the engine produces them: `for out in stream` blocks, `async for` awaits.

    The engine thread puts each RequestOutput, then None after the request's last one (or an exception if the
    engine failed). A stream made inside a running asyncio loop is fed through that loop, so awaiting it never
    blocks the loop or needs a thread per request.
    """

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None):
        self.request_id, self._loop = request_id, loop
        self._queue: queue.SimpleQueue | asyncio.Queue = asyncio.Queue() if loop else queue.SimpleQueue()

    def put(self, item) -> None:
        if self._loop is None:
            self._queue.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    def _check(self, item):
        if item is None:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self):
        if self._loop is not None:
            raise TypeError("this stream was made inside an asyncio loop; use `async for`")
        try:
            while True:
                yield self._check(self._queue.get())
        except StopIteration:
            return

    def __aiter__(self):
        if self._loop is None:
            raise TypeError("this stream was made outside an asyncio loop; use a plain `for`")
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            return self._check(await self._queue.get())
        except StopIteration:
            raise StopAsyncIteration from None


class EngineLoop:
    """Runs `Engine.step()` in a background thread while there is work; submit and abort from any thread.

    Requests and aborts are queued as commands and applied between steps, so callers (an asyncio server) never
    wait for a step; an abort frees the request's KV blocks before the next step runs.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, RequestStream] = {}
        self._calls: deque[tuple[Callable[[Engine], object], concurrent.futures.Future]] = deque()
        self._closed = False
        self.error: BaseException | None = None  # what stopped the loop thread, if it failed
        self.last_stats = engine.stats()  # refreshed after every step, safe to read from any thread
        self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: Seq[int], params: SamplingParams | None = None,
               request_id: str | None = None, adapter: str | None = None) -> RequestStream:
        """Queue a request (checked here, so bad input raises in the caller) and return its output stream;
        `adapter` names a LoRA adapter of the engine's (None: the base model)."""
        if self.error is not None or self._closed:
            raise RuntimeError(f"the engine loop has stopped ({self.error or 'closed'}); start a new one")
        seqs = self.engine.make_request(prompt_ids, params, request_id or uuid.uuid4().hex, adapter)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        stream = RequestStream(seqs[0].request_id, loop)
        self._command("add", seqs, stream)
        return stream

    def abort(self, request_id: str) -> None:
        """Cancel a request: its stream ends with finish_reason "abort" and its blocks are freed."""
        self._command("abort", request_id)

    def call(self, fn: Callable[[Engine], object]) -> concurrent.futures.Future:
        """Run fn(engine) on the engine's thread between two steps; its result or exception comes in the future
        (`asyncio.wrap_future` awaits it)."""
        if self.error is not None or self._closed:
            raise RuntimeError(f"the engine loop has stopped ({self.error or 'closed'}); start a new one")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._command("call", fn, future)
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
            elif kind == "call":
                self._calls.append((args[0], args[1]))
            else:
                self._deliver(self.engine.abort(args[0]))
        if applied:  # an abort frees blocks even when no step follows
            self.last_stats = self.engine.stats()

    def _deliver(self, outs: list[RequestOutput]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                stream.put(out)
        # A request's stream ends after all of this step's outputs: its n samples may finish together.
        for request_id in dict.fromkeys(out.request_id for out in outs):
            if request_id not in self.engine.requests and request_id in self._streams:
                self._streams.pop(request_id).put(None)

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
        self.last_stats = self.engine.stats()

    def _run(self) -> None:
        while not self._closed:
            self._apply_commands()
            self._run_call()
            if not self.engine.has_unfinished():
                if not self._calls:
                    self._wake.wait()
                    self._wake.clear()
                continue
            try:
                try:
                    outs = self.engine.step()
                except Exception as e:  # not one request's fault (Engine.step isolates those): end all in flight
                    log.exception("an engine step failed; every request in flight ends with the error")
                    outs = self.engine.fail_all(e)
                self._deliver(outs)
            except Exception as e:  # the engine cannot even end its requests: stop, ending every open stream
                self.error = e
                for stream in self._streams.values():
                    stream.put(e)
                self._streams.clear()
                for _, future in self._calls:
                    future.set_exception(e)
                raise
            self.last_stats = self.engine.stats()
