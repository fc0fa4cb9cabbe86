"""The engine in its own process, as vLLM's EngineCore: the server's event loop and the engine's step share no GIL.

In one process the engine thread and the HTTP event loop take turns on one interpreter lock: every step's Python
(scheduling, sampling, outputs) waits while the event loop frames JSON and server-sent events, and the other way
round, so a busy server kept a third of the engine's rate on the table (bench/serve_load.py, `http_efficiency`).
`EngineProcess` runs an `EngineLoop` in a child process (spawned: a fresh interpreter, its own torch threads) and
offers the server the loop's own interface (submit, abort, stop, call, alive, error, last_stats, close):

- The parent keeps what is cheap and belongs to the reader: each request is checked here against the engine's
  limits (the same `check_request` the engine runs, so a bad request is the same 400 at once), and its text is
  made here by its stream (lmforge.engine.loop.OutputText), which tells the engine to stop a sequence at a stop
  string.
- Commands (add, abort, stop, call) go down one pipe as they come; a step's outputs, its control fires and the
  engine's stats come back up in one message per step, which a reader thread hands to the streams' event loops in
  one call_soon_threadsafe (lmforge.engine.loop.hand_over). The pipe pickles: a step of 32 outputs is tens of
  microseconds, not worth shared memory.
- A client that goes away aborts at once: the abort is the next command the engine applies, and its blocks are
  free before the next step (the stats that come back say so).
- The child ignores Ctrl-C (the server shuts it down) and exits when the pipe closes, so a killed server leaves
  no engine behind. A child that dies (killed, out of memory) ends every open stream with EngineStopped, refuses
  new requests (the server answers 503), fails pending calls, and calls `on_exit` (`lmforge serve` stops the
  server then, with a non-zero status, for its supervisor to restart).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import itertools
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
import uuid
from collections.abc import Callable
from collections.abc import Sequence as Seq

from lmforge.engine.engine import Engine, check_request
from lmforge.engine.loop import EngineLoop, EngineStopped, OutputText, RequestStream, hand_over, running_loop
from lmforge.engine.sequence import RequestOutput
from lmforge.errors import LmforgeError
from lmforge.infer.controls import ControlGuard
from lmforge.infer.sampling import SamplingParams

log = logging.getLogger("lmforge.engine")


def portable(error: Exception) -> Exception:
    """The exception itself where it survives pickling, else a RuntimeError with its type and message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class _Outbox:
    """The child's side of the pipe: messages sent under one lock (the engine thread and the command reader both
    send); a step's items are gathered and go up together with the stats."""

    def __init__(self, conn):
        self.conn, self.lock = conn, threading.Lock()
        self.items: list[tuple[str, object]] = []
        self.fires: list[tuple[str, str, str]] = []

    def send(self, message) -> None:
        with self.lock:
            self.conn.send(message)

    def flush(self, stats: dict | None) -> None:
        items, fires = self.items, self.fires
        self.items, self.fires = [], []
        items = [(rid, portable(x) if isinstance(x, Exception) else x) for rid, x in items]
        for _, out in items:
            if isinstance(out, RequestOutput) and out.error is not None:
                out.error = portable(out.error)
        self.send(("out", items, fires, stats))


class _ChildStream:
    """What the child's EngineLoop puts a request's items into: the outbox, under the request's id."""

    _loop = None

    def __init__(self, request_id: str, outbox: _Outbox):
        self.request_id, self.outbox = request_id, outbox

    def put(self, item) -> None:
        self.outbox.items.append((self.request_id, item))


class _ChildLoop(EngineLoop):
    """The EngineLoop of the child process: its streams are ids in the outbox, sent once per step with the stats."""

    def __init__(self, engine: Engine, outbox: _Outbox):
        self.outbox = outbox
        super().__init__(engine)

    def _hand_over(self, items: list) -> None:
        for stream, item in items:
            stream.put(item)

    def _run(self) -> None:
        """EngineLoop's; should the loop itself die, what it had to say goes up and the process exits, so the
        parent sees the pipe close instead of a silent engine."""
        try:
            super()._run()
        except BaseException:
            try:
                self.outbox.flush(None)
            finally:
                os._exit(70)

    def _publish(self, stats: dict | None) -> None:
        super()._publish(stats)
        self.outbox.flush(stats)

    def add(self, request_id: str, prompt: list[int], params: SamplingParams, adapter: str | None) -> None:
        """A request from the parent (on the command reader's thread, as a server's submit is)."""
        stream = _ChildStream(request_id, self.outbox)
        if isinstance(params.guard, ControlGuard):  # its fires go back to the parent's guard (counts, /metrics)
            params.guard.on_fire = functools.partial(self._fired, request_id)
        try:
            seqs = self.engine.make_request(prompt, params, request_id, adapter)
        except LmforgeError as e:  # the parent checked it; an adapter unloaded meanwhile gets here
            self.outbox.send(
                (
                    "out",
                    [(request_id, RequestOutput(request_id, 0, finish_reason="error", error=e)), (request_id, None)],
                    [],
                    None,
                )
            )
            return
        self._command("add", seqs, stream)

    def _fired(self, request_id: str, kind: str, control: str) -> None:
        self.outbox.fires.append((request_id, kind, control))

    def reply(self, call_id: int, future: concurrent.futures.Future) -> None:
        error = EngineStopped("the engine closed before the call ran") if future.cancelled() else future.exception()
        if isinstance(error, Exception):
            self.outbox.send(("result", call_id, False, portable(error)))
        else:
            self.outbox.send(("result", call_id, True, future.result()))


def _child(conn, build: Callable[[], Engine], threads: int | None) -> None:
    """The engine process: build the engine, say what the parent needs to check requests, then serve commands
    until "close" or until the pipe closes (the parent is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the server closes us
    import torch

    if threads:
        torch.set_num_threads(threads)
    outbox = _Outbox(conn)
    try:
        engine = build()
    except BaseException as e:
        outbox.send(("failed", f"{type(e).__name__}: {e}"))
        return
    loop = _ChildLoop(engine, outbox)
    outbox.send(("ready", (engine_limits(engine), loop.last_stats)))
    try:
        while True:
            kind, *args = conn.recv()
            if kind == "add":
                loop.add(*args)
            elif kind == "abort":
                loop.abort(*args)
            elif kind == "stop":
                loop.stop(*args)
            elif kind == "call":
                call_id, fn, fn_args = args
                try:
                    future = loop.call(fn, *fn_args)
                except EngineStopped as e:
                    outbox.send(("result", call_id, False, e))
                    continue
                future.add_done_callback(functools.partial(loop.reply, call_id))
            elif kind == "close":
                break
    except (EOFError, OSError):
        pass  # the parent is gone
    finally:
        loop.close()


def engine_limits(engine: Engine) -> dict:
    """What a request is checked against outside the engine (lmforge.engine.engine.check_request)."""
    return dict(
        config=engine.config,
        has_tokenizer=engine.tokenizer is not None,
        num_blocks=engine.block_manager.num_blocks,
        block_size=engine.block_manager.block_size,
    )


class EngineProcess:
    """An EngineLoop's interface over an engine built and run in a child process.

    build: a picklable callable that makes the Engine in the child (it loads the model there); tokenizer: the
    same tokenizer, for the streams' text; threads: the child's torch threads (None: torch's default); on_exit:
    called once (from a thread) if the child dies while the server runs. Start-up waits for the engine to be
    built (or raises RuntimeError with the child's error).
    """

    def __init__(
        self,
        build: Callable[[], Engine],
        tokenizer,
        *,
        threads: int | None = None,
        on_exit: Callable[[], None] | None = None,
    ):
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_child, args=(child, build, threads), name="lmforge-engine", daemon=True)
        self.process.start()
        child.close()
        self.tokenizer, self.on_exit = tokenizer, on_exit
        self._send_lock = threading.Lock()
        try:
            kind, info = self._conn.recv()
        except (EOFError, OSError):
            self.process.join(5)
            kind, info = "failed", f"it exited with code {self.process.exitcode}"
        if kind != "ready":
            self.process.join(5)
            raise RuntimeError(f"the engine process could not start: {info}")
        self.limits, self.last_stats = info
        self.error: BaseException | None = None
        self._closed = False
        # request id -> (stream, its guard: the fires the engine reports are counted there)
        self._streams: dict[str, tuple[RequestStream, ControlGuard | None]] = {}
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._lock = threading.Lock()  # _streams and _calls: the reader thread and the callers' threads
        self._reader = threading.Thread(target=self._read, name="lmforge-engine-reader", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self._closed and self.error is None and self.process.is_alive()

    def submit(
        self,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        adapter: str | None = None,
    ) -> RequestStream:
        """As EngineLoop.submit: the request is checked here (bad input raises in the caller) and queued."""
        if not self.alive:
            raise self._stopped()
        params = params if params is not None else SamplingParams()
        prompt = check_request(prompt_ids, params, **self.limits)
        request_id = request_id if request_id is not None else uuid.uuid4().hex
        now = time.perf_counter()
        texts = [OutputText(self.tokenizer, params.stop, now) for _ in range(params.n)]
        stream = RequestStream(request_id, running_loop(), texts, self.stop)
        with self._lock:
            if request_id in self._streams:
                raise LmforgeError(f"request id {request_id!r} is already in use")
            guard = params.guard if isinstance(params.guard, ControlGuard) else None
            self._streams[request_id] = (stream, guard)
        self._send("add", request_id, prompt, params, adapter)
        return stream

    def abort(self, request_id: str) -> None:
        """As EngineLoop.abort; nothing to do once the engine process is gone (its blocks went with it)."""
        with contextlib.suppress(EngineStopped):
            self._send("abort", request_id)

    def stop(self, request_id: str, index: int) -> None:
        with contextlib.suppress(EngineStopped):
            self._send("stop", request_id, index)

    def call(self, fn: Callable[..., object], *args) -> concurrent.futures.Future:
        """fn(engine, *args) in the engine process between two steps (fn and args are pickled: a module-level
        function and plain data)."""
        if not self.alive:
            raise self._stopped()
        future: concurrent.futures.Future = concurrent.futures.Future()
        call_id = next(self._call_ids)
        with self._lock:
            self._calls[call_id] = future
        self._send("call", call_id, fn, args)
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the engine process (its requests end with the process) and wait for it."""
        if self._closed:
            return
        self._closed = True
        try:
            self._send("close")
        except EngineStopped:
            pass
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self._conn.close()
        self._reader.join(timeout)

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _stopped(self) -> EngineStopped:
        return EngineStopped(str(self.error) if self.error is not None else "the engine process is not running")

    def _send(self, *message) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):  # the pipe is closed: the engine process is gone
            raise self._stopped() from None

    def _read(self) -> None:
        """The reader thread: each message from the child to its streams (one hand-over per step) or callers."""
        try:
            while True:
                message = self._conn.recv()
                if message[0] == "out":
                    self._deliver(*message[1:])
                else:
                    _, call_id, ok, value = message
                    with self._lock:
                        future = self._calls.pop(call_id, None)
                    if future is not None and future.set_running_or_notify_cancel():
                        future.set_result(value) if ok else future.set_exception(value)
        except (EOFError, OSError):
            pass
        except BaseException as e:  # a message that cannot be read: treat the engine as lost
            log.exception("reading from the engine process failed")
            self.error = e
        self._lost()

    def _deliver(self, items: list, fires: list, stats: dict | None) -> None:
        if stats is not None:
            self.last_stats = stats
        with self._lock:
            for request_id, kind, control in fires:
                entry = self._streams.get(request_id)
                if entry is not None and entry[1] is not None:
                    entry[1]._fire(kind, control)  # the parent's guard: its counts and its /metrics hook
            pairs = []
            for request_id, item in items:
                entry = self._streams.get(request_id)
                if entry is None:
                    continue
                pairs.append((entry[0], item))
                if item is None or isinstance(item, BaseException):
                    del self._streams[request_id]
        hand_over(pairs)

    def _lost(self) -> None:
        """The pipe closed: a close, or the child died. End every stream and call; tell the server."""
        if self._closed:
            return
        self.process.join(5)
        code = self.process.exitcode
        self.error = self.error or EngineStopped(f"the engine process exited with code {code}")
        log.error("the engine process exited with code %s; ending every open request", code)
        stopped = self._stopped()
        with self._lock:
            streams, self._streams = self._streams, {}
            calls, self._calls = self._calls, {}
        hand_over([(stream, stopped) for stream, _ in streams.values()])
        for future in calls.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(stopped)
        if self.on_exit is not None:
            self.on_exit()
