"""The edge: what every HTTP request passes before a route sees it, and the counters it leaves behind.

`EdgeMiddleware` checks the body's size (declared or counted as it arrives) and the API key on /v1 and /tokenize
routes, and counts each request in /metrics by a fixed set of route labels. `RateLimiter` is the per-key token
budget, and `Metrics` the app's own Prometheus registry.
"""

from __future__ import annotations

import hmac
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.errors import ApiError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
METRIC_ROUTES = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize", "/health",
                 "/metrics", "/", "/v1/classify"}


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
        self.request_errors = Counter("lmforge_request_errors", "requests that failed inside the engine (each "
                                      "failed alone)", registry=r)

    def control_fired(self, kind: str, control: str) -> None:
        """One fire of a --controls entry (labels come from the operator's file, so their number is bounded)."""
        self.controls_fired.labels(kind, control).inc()

    def observe(self, out) -> None:
        """Count one engine output (lmforge.engine.sequence.RequestOutput)."""
        self.generated_tokens.inc(len(out.new_token_ids))
        m = out.metrics or {}
        if m.get("ttft_s") is not None:
            self.ttft.observe(m["ttft_s"])
        if m.get("itl_s") is not None:
            self.itl.observe(m["itl_s"])

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


class EdgeMiddleware:
    """Every HTTP request: body size limit, API key, per-route metrics.

    Plain ASGI rather than `@app.middleware("http")`, which wraps `receive` and so hides a client's disconnect
    from a streaming response (whose request must then be aborted).
    """

    def __init__(self, app, server):
        self.app, self.server = app, server
        settings = server.settings
        self.max_body, self.keys = settings.max_body_bytes, server.api_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status = {"code": 500}
        extra: list = []

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message = dict(message, headers=list(message.get("headers", [])) + extra)
            await send(message)

        received = 0

        async def receive_limited():  # bodies sent without a content-length are counted as they arrive
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:  # an HTTPException passes FastAPI's body parsing as is
                    raise StarletteHTTPException(400, f"the request body exceeds max_body_bytes={self.max_body}")
            return message

        scope["lmforge.api_key"] = "anonymous"
        try:
            self.check(scope, path, headers)
        except ApiError as e:
            await e.response()(scope, receive, send_with_headers)
        else:
            await self.app(scope, receive_limited, send_with_headers)
        finally:  # a fixed set of route labels: a client cannot grow the metrics by inventing paths
            route = path if path in METRIC_ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") \
                else "other"
            self.server.metrics.requests.labels(route, str(status["code"])).inc()

    def check(self, scope, path: str, headers: dict[str, str]) -> None:
        """Declared body size and API key; the key that matched is left in scope["lmforge.api_key"]."""
        try:
            size = int(headers.get("content-length") or 0)
        except ValueError:
            raise ApiError(400, "the Content-Length header is not a number") from None
        if size > self.max_body:
            raise ApiError(400, f"the request body is {size} bytes; the limit is max_body_bytes={self.max_body}")
        if self.keys and path.startswith(PROTECTED_PREFIXES):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth.lower().startswith("bearer ") else ""
            match = [k for k in self.keys if hmac.compare_digest(given.encode(), k.encode())]
            if not match:
                raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer KEY'",
                               type="authentication_error", code="invalid_api_key")
            scope["lmforge.api_key"] = match[0]
