"""The OpenAI-compatible HTTP server: FastAPI routes over one EngineLoop.

Each request is checked and converted at the edge (protocol.py: pydantic models -> SamplingParams; templates.py:
messages -> prompt text; structured.py: response formats -> a token mask), submitted to the engine loop, and its
outputs are turned back into OpenAI's JSON, whole or as server-sent events ending in `data: [DONE]`. Everything a
client can get wrong comes back as OpenAI's error JSON with the status code the reference uses.

Admission: at most max_batch + max_queue requests are in flight (429 with Retry-After beyond that); with API
keys, each key may be given a token budget per minute. A client that disconnects has its request aborted, which
frees its KV blocks before the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, Literal

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.apps.classify import CLASSIFY_FILE
from lmforge.engine.engine import Engine
from lmforge.engine.loop import EngineLoop, RequestStream
from lmforge.engine.sequence import RequestOutput
from lmforge.infer.controls import Controls, ControlSpec, load_controls
from lmforge.infer.generate import prompt_tokens
from lmforge.infer.sampling import SamplingError, SamplingParams
from lmforge.serve.classify import ClassifierService, classify_router
from lmforge.serve.protocol import (ApiError, ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                    TokenizeRequest)
from lmforge.serve.structured import (JSON_OBJECT_SCHEMA, ConstraintCompiler, StructuredOutputError, check_regex,
                                      regex_for_choice, regex_for_json_schema, token_bytes)
from lmforge.templates import ChatTemplate, ChatTemplateError

log = logging.getLogger("lmforge.serve")
STATIC_DIR = Path(__file__).parent / "static"
PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
METRIC_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                 "/metrics", "/", "/v1/classify"}


@dataclass
class ServeSettings:
    """What `lmforge serve` was asked for; create_app takes it so tests can build the same app in-process."""

    model_name: str = "lmforge"
    max_batch: int = 16  # sequences decoded together (the engine's max_num_seqs)
    max_queue: int = 64  # requests waiting beyond the running batch before 429
    max_model_len: int | None = None  # prompt + output tokens per request; None: the model's context
    api_keys: list[str] = field(default_factory=list)  # empty: no authentication
    rate_limit_tpm: int = 0  # tokens (prompt + generated) per minute per API key; 0: unlimited
    max_body_bytes: int = 1_000_000
    chat_template: str | None = None  # Jinja source; None: the default for the tokenizer (templates.py)
    draft: str | None = None  # the draft model's path (speculative decoding), as reported by /health
    num_speculative_tokens: int = 4
    max_num_batched_tokens: int = 256
    kv_dtype: str = "auto"  # the KV cache's dtype: auto (the model's) or float16 (half the bytes per token)
    classifier: str | None = None  # a classifier folder (lmforge classify train) served at /v1/classify
    controls: str | None = None  # banned phrases and word logit biases for every request (lmforge.infer.controls)


# ---------------------------------------------------------------------------------- metrics

class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process do not collide)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("lmforge_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("lmforge_generated_tokens", "tokens generated", registry=r)
        self.queue = Gauge("lmforge_queue_length", "sequences waiting for a batch slot", registry=r)
        self.running = Gauge("lmforge_running_batch_size", "sequences in the running batch", registry=r)
        self.kv_used = Gauge("lmforge_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("lmforge_kv_blocks_free", "KV cache blocks free", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "time to first token", registry=r,
                              buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "mean time between output tokens", registry=r,
                             buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1))
        self.controls_fired = Counter("lmforge_control_fired", "--controls entries that fired, by kind "
                                      "(banned_phrase, logit_bias) and entry", ["kind", "control"], registry=r)

    def control_fired(self, kind: str, control: str) -> None:
        """One fire of a --controls entry (labels come from the operator's file, so their number is bounded)."""
        self.controls_fired.labels(kind, control).inc()

    def scrape(self, stats: dict) -> bytes:
        self.queue.set(stats["waiting"])
        self.running.set(stats["running"])
        self.kv_used.set(stats["kv_blocks_used"])
        self.kv_free.set(stats["kv_blocks_free"])
        return generate_latest(self.registry)


class RateLimiter:
    """Tokens per minute per API key over a sliding 60 s window."""

    def __init__(self, tokens_per_minute: int):
        self.limit = tokens_per_minute
        self.spent: dict[str, deque[tuple[float, int]]] = {}

    def _used(self, key: str, now: float) -> int:
        window = self.spent.setdefault(key, deque())
        while window and window[0][0] < now - 60:
            window.popleft()
        return sum(n for _, n in window)

    def check(self, key: str) -> None:
        if self.limit <= 0:
            return
        now = time.monotonic()
        if self._used(key, now) >= self.limit:
            retry = max(1, int(60 - (now - self.spent[key][0][0])) + 1)
            raise ApiError(429, f"rate limit of {self.limit} tokens per minute reached for this API key; retry in "
                                f"{retry} s", type="rate_limit_error", code="rate_limit_exceeded",
                           headers={"Retry-After": str(retry)})

    def charge(self, key: str, tokens: int) -> None:
        if self.limit > 0:
            self.spent.setdefault(key, deque()).append((time.monotonic(), tokens))


# ---------------------------------------------------------------------------------- the server's state

class Slot:
    """One admitted request's place. `release` (idempotent) ends it whichever way the request ends: it aborts
    the engine requests still running (a no-op for finished ones; a disconnected client's are freed at once),
    frees the place and charges the tokens to the API key."""

    def __init__(self, server: "Server", key: str):
        self.server, self.key, self.tokens, self.released = server, key, 0, False
        self.request_ids: list[str] = []

    def release(self) -> None:
        if not self.released:
            self.released = True
            for rid in self.request_ids:
                self.server.loop.abort(rid)
            self.server.active -= 1
            self.server.rate.charge(self.key, self.tokens)

class Server:
    """One model served: engine loop, tokenizer, chat template, structured-output compiler, admission."""

    def __init__(self, model, tokenizer, settings: ServeSettings, model_folder: str | Path | None = None,
                 draft=None):
        if tokenizer is None:
            raise ValueError("serving needs a tokenizer: the model folder has none; pass --tokenizer PATH")
        self.settings, self.tokenizer = settings, tokenizer
        ctx = model.config.block_size
        self.max_model_len = min(ctx, settings.max_model_len or ctx)
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len={settings.max_model_len} is too small; it must be >= 2")
        self.engine = Engine(model, tokenizer, max_num_seqs=settings.max_batch,
                             max_num_batched_tokens=max(settings.max_num_batched_tokens, settings.max_batch),
                             draft=draft, num_speculative_tokens=settings.num_speculative_tokens,
                             kv_dtype=None if settings.kv_dtype == "auto" else getattr(torch, settings.kv_dtype))
        self.vocab_size = model.config.vocab_size
        self.template = ChatTemplate(settings.chat_template, tokenizer) if settings.chat_template else \
            ChatTemplate.for_model(model_folder, tokenizer)
        self.compiler = ConstraintCompiler(tokenizer, self.vocab_size)
        self.controls = Controls.from_file(settings.controls, tokenizer, self.vocab_size) if settings.controls \
            else None
        self.metrics = Metrics()
        self.rate = RateLimiter(settings.rate_limit_tpm)
        self.loop: EngineLoop | None = None
        self._token_bytes: dict[int, bytes] | None = None
        self.active = 0  # HTTP generation requests in flight
        self.created = int(time.time())

    # -- admission
    def admit(self, key: str) -> "Slot":
        """Take a place for one request (429 when full or over the key's rate); release it when the request ends."""
        limit = self.settings.max_batch + self.settings.max_queue
        if self.active >= limit:
            raise ApiError(429, f"the server is full: {self.active} requests in flight (max_batch "
                                f"{self.settings.max_batch} + max_queue {self.settings.max_queue}); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
        self.rate.check(key)
        self.active += 1
        return Slot(self, key)

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.settings.model_name:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.settings.model_name!r}", "model", code="model_not_found")

    # -- requests -> engine inputs
    def max_tokens(self, requested: int | None, prompt_len: int, default: int | None, param: str,
                   prompt_param: str) -> int:
        """The request's output budget: what it asked for (or `default`, or all the room left), checked to fit."""
        room = self.max_model_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt is {prompt_len} tokens but max_model_len is {self.max_model_len}; "
                                f"shorten it", prompt_param, code="context_length_exceeded")
        wanted = requested if requested is not None else (default if default is not None else room)
        if wanted > room:
            raise ApiError(400, f"{param}={wanted} plus the prompt's {prompt_len} tokens exceeds max_model_len "
                                f"{self.max_model_len}; lower {param} to at most {room}", param,
                           code="context_length_exceeded")
        return wanted

    def constraint_regex(self, req) -> tuple[str, str] | None:
        """(regex, param) of the request's structured-output format, or None for free text."""
        fmt = getattr(req, "response_format", None)
        chosen = [p for p, v in (("regex", req.regex), ("choice", req.choice)) if v is not None]
        if fmt is not None and fmt.type != "text":
            chosen.append("response_format")
        if len(chosen) > 1:
            raise ApiError(400, f"give at most one output format; got {', '.join(chosen)}", chosen[1])
        if req.regex is not None:
            return check_regex(req.regex), "regex"
        if req.choice is not None:
            return regex_for_choice(req.choice), "choice"
        if fmt is not None and fmt.type == "json_object":
            return regex_for_json_schema(JSON_OBJECT_SCHEMA), "response_format"
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise ApiError(400, "response_format of type json_schema needs json_schema.schema",
                               "response_format")
            return regex_for_json_schema(fmt.json_schema.schema_), "response_format"
        return None

    async def attach_constraint(self, req, params) -> None:
        spec = self.constraint_regex(req)
        if spec is not None:
            params.allowed_tokens = await asyncio.to_thread(self.compiler.constraint, *spec)

    def attach_controls(self, params: SamplingParams, phrases: list[str] | None = None):
        """Apply --controls and the request's own banned phrases (checked on the text, as --controls's are) to its
        params; the guard (None when there is neither) counts what fired. /metrics counts --controls entries
        only: a client's phrases would make its label values unbounded."""
        phrases = [p for p in phrases or [] if p]
        if not phrases:
            return self.controls.attach(params, self.metrics.control_fired) if self.controls is not None else None
        base = self.controls.spec if self.controls is not None else ControlSpec()
        spec = ControlSpec(base.banned_phrases + [p for p in phrases if p not in base.banned_phrases],
                           dict(base.logit_bias), base.ignore_case)
        operator = set(base.banned_phrases)

        def on_fire(kind: str, control: str) -> None:
            if kind == "logit_bias" or control in operator:
                self.metrics.control_fired(kind, control)

        return Controls(spec, self.tokenizer, self.vocab_size).attach(params, on_fire)

    # -- running
    def submit(self, prompts: list[list[int]], params: SamplingParams, slot: "Slot") -> list[RequestStream]:
        """Queue one engine request per prompt (all or none: a bad one aborts the others, 400 naming the cause)."""
        base = uuid.uuid4().hex
        streams = []
        try:
            for i, prompt in enumerate(prompts):
                slot.request_ids.append(f"{base}-{i}")
                streams.append(self.loop.submit(prompt, params, slot.request_ids[-1]))
        except ValueError as e:
            slot.release()
            m = re.search(r"sampling setting (\w+)|(max_tokens)", str(e))
            raise ApiError(400, str(e), next((g for g in m.groups() if g), None) if m else None) from e
        self.metrics.prompt_tokens.inc(sum(map(len, prompts)))
        return streams

    async def outputs(self, streams: list[RequestStream], http: Request) -> AsyncIterator[tuple[int, RequestOutput]]:
        """(prompt index, RequestOutput) as the engine produces them; ends early when the client disconnects."""
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: RequestStream) -> None:
            try:
                async for out in stream:
                    await merged.put((i, out))
            except Exception as e:  # the engine failed: surface it to the request
                await merged.put((i, e))
            await merged.put((i, None))

        async def watch() -> None:  # a client that goes away stops its request (its slot's release aborts it)
            while not await http.is_disconnected():
                await asyncio.sleep(0.25)
            await merged.put((-1, None))

        tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)] + [asyncio.create_task(watch())]
        open_streams = len(streams)
        try:
            while open_streams:
                i, out = await merged.get()
                if i < 0:
                    return
                if out is None:
                    open_streams -= 1
                    continue
                if isinstance(out, Exception):
                    raise ApiError(500, f"the engine failed: {out}", type="server_error")
                self.metrics.generated_tokens.inc(len(out.new_token_ids))
                m = out.metrics or {}
                if m.get("ttft_s") is not None:
                    self.metrics.ttft.observe(m["ttft_s"])
                if m.get("itl_s") is not None:
                    self.metrics.itl.observe(m["itl_s"])
                yield i, out
        finally:
            for t in tasks:
                t.cancel()

    def token_bytes(self, token: int) -> bytes:
        """The bytes a token adds to the text (exact even for a piece of a multi-byte character)."""
        if self._token_bytes is None:
            try:
                self._token_bytes = token_bytes(self.tokenizer)
            except StructuredOutputError:  # word tokenizers: their decoded text is the best there is
                self._token_bytes = {}
        b = self._token_bytes.get(token)
        return b if b is not None else self.tokenizer.decode([token]).encode("utf-8")

    def token_text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")


# ---------------------------------------------------------------------------------- response builders

def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(server: Server, lps, offset: int) -> dict:
    tokens, token_lps, tops, offsets = [], [], [], []
    for lp in lps:
        text = server.token_text(lp.token)
        tokens.append(text), token_lps.append(lp.logprob), offsets.append(offset)
        tops.append({server.token_text(t): v for t, v in lp.top.items()})
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _chat_logprobs(server: Server, lps) -> dict:
    def entry(token: int, logprob: float) -> dict:
        return {"token": server.token_text(token), "logprob": logprob, "bytes": list(server.token_bytes(token))}
    return {"content": [dict(entry(lp.token, lp.logprob), top_logprobs=[entry(t, v) for t, v in lp.top.items()])
                        for lp in lps], "refusal": None}


def _extra(guard) -> dict:
    """The response's lmforge-only field: how often each --controls entry fired for this request (so far, on a
    stream's finish chunks). Clients of the OpenAI API ignore unknown fields; openai's objects keep it in
    `model_extra`."""
    return {"lmforge": {"controls": guard.counts()}} if guard is not None else {}


def _finish(reason: str | None) -> str | None:
    return "stop" if reason == "abort" else reason


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------- the app

class EdgeMiddleware:
    """Every HTTP request: body size limit, API key, per-route request metrics.

    Plain ASGI rather than `@app.middleware("http")`, which wraps `receive` and so hides a client's disconnect
    from a streaming response (whose request must then be aborted).
    """

    def __init__(self, app, server: "Server"):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings, path = self.server.settings, scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status = {"code": 500}

        async def send_status(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        received = 0

        async def receive_limited():  # bodies sent without a content-length are counted as they arrive
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > settings.max_body_bytes:  # an HTTPException passes FastAPI's body parsing as is
                    raise StarletteHTTPException(400, f"the request body exceeds max_body_bytes="
                                                      f"{settings.max_body_bytes}")
            return message

        scope["lmforge.api_key"] = "anonymous"
        try:
            size = int(headers.get("content-length") or 0)
            if size > settings.max_body_bytes:
                raise ApiError(400, f"the request body is {size} bytes; the limit is max_body_bytes="
                                    f"{settings.max_body_bytes}")
            if settings.api_keys and path.startswith(PROTECTED_PREFIXES):
                auth = headers.get("authorization", "")
                given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
                match = [k for k in settings.api_keys if hmac.compare_digest(given.encode(), k.encode())]
                if not match:
                    raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                                   type="authentication_error", code="invalid_api_key")
                scope["lmforge.api_key"] = match[0]
        except ApiError as e:
            await _error_response(e)(scope, receive, send_status)
        else:
            await self.app(scope, receive_limited, send_status)
        finally:  # a fixed set of route labels: a client cannot grow the metrics by inventing paths
            route = path if path in METRIC_ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") \
                else "other"
            self.server.metrics.requests.labels(route, str(status["code"])).inc()


class SSEResponse(StreamingResponse):
    """Server-sent events whose generator is closed when the client goes away, so its request is aborted.

    Starlette cancels a streaming response on disconnect but leaves the generator suspended (closed only when
    garbage collected); closing it here runs its `finally`, which aborts the engine request at once. The slot
    is released here too, so a response that never started streaming does not keep its place.
    """

    def __init__(self, content, slot: Slot):
        super().__init__(content, media_type="text/event-stream")
        self.slot = slot

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.slot.release()


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status, headers=e.headers)


def create_app(model, tokenizer, settings: ServeSettings | None = None,
               model_folder: str | Path | None = None, draft=None) -> FastAPI:
    """The FastAPI app serving `model` (an lmforge Transformer) with `tokenizer`; the engine loop runs while the
    app's lifespan does. `model_folder` is where the chat template is looked for (tokenizer_config.json);
    `draft`, a smaller model sharing the tokenizer, turns on speculative decoding in the engine."""
    settings = settings or ServeSettings()
    server = Server(model, tokenizer, settings, model_folder, draft)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.loop = EngineLoop(server.engine)
        try:
            yield
        finally:  # uvicorn runs this on SIGTERM/SIGINT after open responses end
            server.loop.close()

    app = FastAPI(title="lmforge", version="1", lifespan=lifespan)
    app.state.server = server

    # -- errors in OpenAI's shape
    @app.exception_handler(ApiError)
    async def _api_error(_, e: ApiError):
        return _error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        param = ".".join(loc) or None
        return _error_response(ApiError(400, f"{param or 'body'}: {err.get('msg', 'invalid request')}", param))

    @app.exception_handler(StructuredOutputError)
    async def _structured_error(_, e: StructuredOutputError):
        return _error_response(ApiError(400, str(e), e.param))

    @app.exception_handler(SamplingError)
    async def _sampling_error(_, e: SamplingError):
        m = re.search(r"sampling setting (\w+)", str(e))
        return _error_response(ApiError(400, str(e), m.group(1) if m else None))

    @app.exception_handler(ChatTemplateError)
    async def _template_error(_, e: ChatTemplateError):
        return _error_response(ApiError(400, str(e), "messages"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error_response(ApiError(e.status_code, str(e.detail), type=kind))

    @app.exception_handler(Exception)
    async def _server_error(_, e: Exception):
        log.exception("unhandled error")
        return _error_response(ApiError(500, f"internal error: {type(e).__name__}", type="server_error"))

    app.add_middleware(EdgeMiddleware, server=server)
    app.include_router(classify_router(ClassifierService(settings.classifier, (settings.model_name,))
                                       if settings.classifier else None))

    # -- pages
    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page)
        return HTMLResponse("<!doctype html><title>lmforge</title><p>lmforge is serving "
                            f"{settings.model_name}: POST /v1/chat/completions.</p>")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")

    @app.get("/health")
    async def health():
        loop = server.loop
        ok = loop is not None and loop.error is None
        body = {"status": "ok" if ok else "error", "model": settings.model_name, "active_requests": server.active,
                "draft": settings.draft, "engine": loop.last_stats if loop else None}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.scrape(server.loop.last_stats), media_type=CONTENT_TYPE_LATEST)

    def model_card() -> dict:
        return {"id": settings.model_name, "object": "model", "created": server.created, "owned_by": "lmforge",
                "max_model_len": server.max_model_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def retrieve_model(model: str):
        server.check_model(model)
        return model_card()

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest):
        server.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give exactly one of prompt or messages", "prompt")
        text = req.prompt if req.prompt is not None else server.template.render(
            [{"role": m.role, "content": m.text()} for m in req.messages])
        tokens = tokenizer.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": server.max_model_len}

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest):
        server.check_model(req.model)
        bad = [t for t in req.tokens if not 0 <= t < tokenizer.vocab_size]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary 0..{tokenizer.vocab_size - 1}",
                           "tokens")
        return {"prompt": tokenizer.decode(req.tokens)}

    # -- completions
    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, http: Request):
        server.check_model(req.model)
        prompts = _prompts(req.prompt)
        longest = max(map(len, prompts))
        params = req.to_sampling_params(server.max_tokens(req.max_tokens, longest, 16, "max_tokens", "prompt"))
        await server.attach_constraint(req, params)
        guard = server.attach_controls(params, req.banned_phrases)
        slot = server.admit(http.scope["lmforge.api_key"])
        streams = server.submit(prompts, params, slot)
        created, rid = int(time.time()), f"cmpl-{uuid.uuid4().hex}"
        n = params.n
        echo = [tokenizer.decode(p) for p in prompts] if req.echo else None

        def chunk(choices, usage=None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": settings.model_name,
                    "choices": choices, "usage": usage, "system_fingerprint": None}

        async def run():
            sent_echo: set[int] = set()
            slot.tokens = sum(map(len, prompts))
            async with contextlib.aclosing(server.outputs(streams, http)) as outs:
                async for i, out in outs:
                    index = i * n + out.index
                    slot.tokens += len(out.new_token_ids)
                    text = out.text
                    if echo and index not in sent_echo:
                        sent_echo.add(index)
                        text = echo[i] + text
                    lp = _completion_logprobs(server, out.logprobs, 0) if out.logprobs else None
                    yield index, text, lp, out

        usage = lambda c: _usage(sum(map(len, prompts)), c)  # noqa: E731
        if req.stream:
            async def events():
                total = 0
                async with contextlib.aclosing(run()) as outs:
                    try:
                        async for index, text, lp, out in outs:
                            total += len(out.new_token_ids)
                            if text or out.finished or lp:
                                yield _sse(chunk([{"index": index, "text": text, "logprobs": lp,
                                                   "finish_reason": _finish(out.finish_reason)}])
                                           | (_extra(guard) if out.finished else {}))
                    except ApiError as e:  # after the 200 went out, an error can only be an event
                        yield _sse(e.body())
                        return
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(chunk([], usage(total)))
                yield "data: [DONE]\n\n"
            return SSEResponse(events(), slot)

        choices = {i: {"index": i, "text": "", "logprobs": None, "finish_reason": None}
                   for i in range(len(prompts) * n)}
        total = 0
        try:
            async with contextlib.aclosing(run()) as outs:
                async for index, text, lp, out in outs:
                    c = choices[index]
                    c["text"] += text
                    total += len(out.new_token_ids)
                    if lp:
                        c["logprobs"] = lp if c["logprobs"] is None else {k: c["logprobs"][k] + lp[k] for k in lp}
                    c["finish_reason"] = _finish(out.finish_reason)
        finally:
            slot.release()
        for c in choices.values():  # text offsets run over the whole completion
            if c["logprobs"]:
                c["logprobs"]["text_offset"] = list(_offsets(c["logprobs"]["tokens"]))
        return chunk(list(choices.values()), usage(total)) | _extra(guard)

    # -- chat completions
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, http: Request):
        server.check_model(req.model)
        text = server.template.render([{"role": m.role, "content": m.text()} for m in req.messages])
        prompt = tokenizer.encode(text) or prompt_tokens(tokenizer, "")
        params = req.to_sampling_params(
            server.max_tokens(req.requested_max_tokens(), len(prompt), None,
                              "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
                              "messages"))
        if server.constraint_regex(req) is None:  # a constrained output ends by its format, not by a turn marker
            params.stop += [s for s in server.template.turn_stops if s not in params.stop]
        await server.attach_constraint(req, params)
        guard = server.attach_controls(params, req.banned_phrases)
        slot = server.admit(http.scope["lmforge.api_key"])
        streams = server.submit([prompt], params, slot)
        created, rid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex}"

        def chunk(choices, usage=None, obj="chat.completion.chunk") -> dict:
            return {"id": rid, "object": obj, "created": created, "model": settings.model_name,
                    "choices": choices, "usage": usage, "system_fingerprint": None}

        async def run():
            slot.tokens = len(prompt)
            async with contextlib.aclosing(server.outputs(streams, http)) as outs:
                async for _, out in outs:
                    slot.tokens += len(out.new_token_ids)
                    yield out

        if req.stream:
            async def events():
                total = 0
                for j in range(params.n):
                    yield _sse(chunk([{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                       "finish_reason": None}]))
                async with contextlib.aclosing(run()) as outs:
                    try:
                        async for out in outs:
                            total += len(out.new_token_ids)
                            lp = _chat_logprobs(server, out.logprobs) if out.logprobs else None
                            if out.text or lp:
                                yield _sse(chunk([{"index": out.index, "delta": {"content": out.text},
                                                   "logprobs": lp, "finish_reason": None}]))
                            if out.finished:
                                yield _sse(chunk([{"index": out.index, "delta": {}, "logprobs": None,
                                                   "finish_reason": _finish(out.finish_reason)}]) | _extra(guard))
                    except ApiError as e:  # after the 200 went out, an error can only be an event
                        yield _sse(e.body())
                        return
                if req.stream_options and req.stream_options.include_usage:
                    yield _sse(chunk([], _usage(len(prompt), total)))
                yield "data: [DONE]\n\n"
            return SSEResponse(events(), slot)

        choices = [{"index": j, "message": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None, "finish_reason": None} for j in range(params.n)]
        total = 0
        try:
            async with contextlib.aclosing(run()) as outs:
                async for out in outs:
                    c = choices[out.index]
                    c["message"]["content"] += out.text
                    total += len(out.new_token_ids)
                    if out.logprobs:
                        lp = _chat_logprobs(server, out.logprobs)
                        c["logprobs"] = lp if c["logprobs"] is None else {
                            "content": c["logprobs"]["content"] + lp["content"], "refusal": None}
                    c["finish_reason"] = _finish(out.finish_reason)
        finally:
            slot.release()
        return chunk(choices, _usage(len(prompt), total), obj="chat.completion") | _extra(guard)

    def _prompts(prompt) -> list[list[int]]:
        """The completions `prompt` field (text, texts, token ids, lists of token ids) as token id lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if prompt and all(isinstance(t, int) for t in prompt):
            prompt = [prompt]
        if not prompt:
            raise ApiError(400, "prompt is empty", "prompt")
        out = []
        for p in prompt:
            ids = prompt_tokens(tokenizer, p) if isinstance(p, str) else list(p)
            if not ids or min(ids) < 0 or max(ids) >= server.vocab_size:
                raise ApiError(400, f"prompt token ids must be in 0..{server.vocab_size - 1}", "prompt")
            out.append(ids)
        return out

    return app


def _offsets(tokens: list[str]):
    offset = 0
    for t in tokens:
        yield offset
        offset += len(t)


# ---------------------------------------------------------------------------------- the command

def serve_command(model: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                  api_key_file: str | None = None, max_batch: int = 16, max_queue: int = 64,
                  max_model_len: int | None = None, quantize: Literal["none", "int8", "int4"] = "none",
                  draft: str | None = None, num_speculative_tokens: int = 4, tokenizer: str | None = None,
                  dtype: Literal["float32", "bfloat16"] = "float32",
                  kv_dtype: Literal["auto", "float16"] = "auto", served_model_name: str | None = None,
                  rate_limit_tpm: int = 0, max_body_bytes: int = 1_000_000,
                  log_level: Literal["critical", "error", "warning", "info", "debug"] = "info",
                  adapter: str | None = None, classifier: str | None = None, controls: str | None = None) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) and a web chat.

    Args:
        model: model folder (lmforge run or imported Hugging Face folder) or a llama2.c .bin file.
        host: address to listen on; 127.0.0.1 keeps it on this machine, 0.0.0.0 opens it to the network.
        port: TCP port to listen on.
        api_key: require this key as 'Authorization: Bearer KEY' on /v1 and /tokenize routes.
        api_key_file: file with one accepted API key per line (combined with --api-key).
        max_batch: sequences decoded together in one batch.
        max_queue: requests allowed to wait beyond the running batch; more get 429 with Retry-After.
        max_model_len: prompt plus output tokens per request at most (default: the model's context).
        quantize: int8 or int4 (GGUF Q4_0's blocks) quantizes the linear layers' weights at load time (less
            memory, faster decoding on CPU).
        draft: a smaller model sharing the tokenizer: speculative decoding of every running request (the
            output keeps the model's distribution; greedy output is unchanged).
        num_speculative_tokens: tokens the draft proposes per request and step.
        tokenizer: tokenizer.json or folder to use instead of the model folder's own.
        dtype: weights dtype; bfloat16 halves the weights' memory and, on CPUs with AVX-512 BF16 or AMX, decodes
            many requests at once about twice as fast (bench/engine.py).
        kv_dtype: the KV cache's dtype: auto is the model's; float16 under a float32 model halves the bytes per
            token (twice the context in the same memory, faster attention at many requests) and rounds keys and
            values to 11 significant bits.
        served_model_name: the model id clients send (default: the model folder's name).
        rate_limit_tpm: tokens (prompt + generated) per minute per API key; 0 means unlimited.
        max_body_bytes: largest request body accepted.
        log_level: uvicorn's log level.
        adapter: a LoRA adapter folder merged into the model on load (its saved chat template is used).
        classifier: a classifier folder (`lmforge classify train`) served at POST /v1/classify (default: MODEL
            itself when it is one).
        controls: banned phrases and word logit biases applied to every request (JSON or text file, see
            lmforge.infer.controls); responses carry the fire counts in an extra `lmforge` field, /metrics in
            lmforge_control_fired_total.
    """
    import uvicorn

    from lmforge.loader import load

    keys = [api_key] if api_key else []
    if api_key_file:
        path = Path(api_key_file)
        if not path.is_file():
            raise FileNotFoundError(f"API key file {path} does not exist")
        keys += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not keys:
            raise ValueError(f"API key file {path} holds no keys (one per line expected)")
    for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 0), ("port", port, 0)):
        if value < low:
            raise ValueError(f"{name}={value} is out of range: it must be >= {low}")
    if controls:
        load_controls(controls)  # a bad file fails now, before the model loads
    quantize = None if quantize == "none" else quantize
    loaded = load(model, dtype=dtype, quantize=quantize, adapter=adapter, tokenizer=tokenizer)
    net, tok = loaded.model, loaded.tokenizer
    path = Path(model)
    settings = ServeSettings(model_name=served_model_name or path.stem, max_batch=max_batch, max_queue=max_queue,
                             max_model_len=max_model_len, api_keys=keys, rate_limit_tpm=rate_limit_tpm,
                             max_body_bytes=max_body_bytes, draft=draft,
                             num_speculative_tokens=num_speculative_tokens, kv_dtype=kv_dtype,
                             classifier=classifier or (model if (path / CLASSIFY_FILE).is_file() else None),
                             controls=controls)
    draft_net = None
    if draft:
        draft_net = load(draft, dtype=dtype, quantize=quantize, tokenizer=tokenizer).model
    app = create_app(net, tok, settings, loaded.template_folder or path.parent, draft_net)
    uvicorn.run(app, host=host, port=port, log_level=log_level)
    return 0
