"""The edge: what every HTTP request passes before a route sees it, and the counters it leaves behind.

`EdgeMiddleware` checks, in order: the Host header against the allow-list (a DNS-rebinding page names its own
host), the body's size (declared or counted as it arrives), and the API key on /v1 and /tokenize routes; it adds
the security headers (the web page gets a Content-Security-Policy it works under) and counts each request in
/metrics by a fixed set of route labels. `RateLimiter` is the per-key token budget that admission reserves from,
and `Metrics` the app's own Prometheus registry.
"""

from __future__ import annotations

import hmac
import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.serve.errors import ApiError

PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
METRIC_ROUTES = {
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/tokenize",
    "/detokenize",
    "/health",
    "/metrics",
    "/",
    "/v1/classify",
    "/v1/embeddings",
    "/v1/load_lora_adapter",
    "/v1/unload_lora_adapter",
}
# The web chat (/ and /static/) is served under a Content-Security-Policy. The page loads its script and
# stylesheet from /static, talks to this origin only, sets styles through the CSSOM (allowed by
# style-src 'self'), and its favicon is an empty data: URL.
PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class Metrics:
    """Prometheus metrics in the app's own registry (two apps in one process do not collide)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "lmforge_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens of admitted requests", registry=r)
        self.generated_tokens = Counter("lmforge_generated_tokens", "tokens generated", registry=r)
        self.queue = Gauge("lmforge_queue_length", "sequences waiting for a batch slot", registry=r)
        self.running = Gauge("lmforge_running_batch_size", "sequences in the running batch", registry=r)
        self.kv_used = Gauge("lmforge_kv_blocks_used", "KV cache blocks in use", registry=r)
        self.kv_free = Gauge("lmforge_kv_blocks_free", "KV cache blocks free", registry=r)
        self.ttft = Histogram(
            "lmforge_time_to_first_token_seconds",
            "time to first token",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.itl = Histogram(
            "lmforge_inter_token_latency_seconds",
            "mean time between output tokens",
            registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
        )
        self.controls_fired = Counter(
            "lmforge_control_fired",
            "--controls entries that fired, by kind (banned_phrase, logit_bias) and entry",
            ["kind", "control"],
            registry=r,
        )
        self.request_errors = Counter(
            "lmforge_request_errors", "requests that failed inside the engine (each failed alone)", registry=r
        )

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
    """Tokens per minute per API key over a sliding 60 s window, reserved up front and settled at the end.

    `reserve` books a request's most tokens (prompt + max_tokens x n x prompts) when it is admitted, so
    concurrent requests cannot all pass a check made before any of them is charged; `settle` replaces the
    booking with what the request really used when it ends (the rest is refunded).
    """

    def __init__(self, tokens_per_minute: int):
        self.limit = tokens_per_minute
        self.spent: dict[str, deque[list]] = {}  # key -> [time, tokens] entries, oldest first

    def _used(self, key: str, now: float) -> int:
        window = self.spent.setdefault(key, deque())
        while window and window[0][0] < now - 60:
            window.popleft()
        return sum(n for _, n in window)

    def reserve(self, key: str, tokens: int, param: str = "max_tokens") -> list | None:
        """Book `tokens` for `key` (429 when the window cannot hold them, 400 when no window ever could)."""
        if self.limit <= 0:
            return None
        if tokens > self.limit:
            raise ApiError(
                400,
                f"this request may use up to {tokens} tokens (prompt plus max_tokens x n for each "
                f"prompt), more than this API key's limit of {self.limit} tokens per minute; lower "
                f"max_tokens or n",
                param,
                code="rate_limit_exceeded",
            )
        now = time.monotonic()
        used = self._used(key, now)
        if used + tokens > self.limit:
            window = self.spent[key]
            retry = max(1, int(60 - (now - window[0][0])) + 1) if window else 1
            raise ApiError(
                429,
                f"rate limit of {self.limit} tokens per minute reached for this API key ({used} "
                f"used or reserved, this request may use {tokens}); retry in {retry} s",
                type="rate_limit_error",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(retry)},
            )
        entry = [now, tokens]
        self.spent[key].append(entry)
        return entry

    @staticmethod
    def settle(entry: list | None, tokens: int) -> None:
        """Charge what the request used in place of its reservation."""
        if entry is not None:
            entry[1] = tokens


def host_name(value: str) -> str:
    """The name in a Host header, lower case, without its port ("[::1]:8000" -> "::1")."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class EdgeMiddleware:
    """Every HTTP request: Host allow-list, body size limit, API key, security headers, per-route metrics.

    Plain ASGI rather than `@app.middleware("http")`, which wraps `receive` and so hides a client's disconnect
    from a streaming response (whose request must then be aborted).
    """

    def __init__(self, app, server):
        self.app, self.server = app, server
        settings = server.settings
        self.max_body, self.hosts, self.keys = settings.max_body_bytes, settings.host_names(), server.api_keys

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        status = {"code": 500}
        extra = SECURITY_HEADERS + (
            [(b"content-security-policy", PAGE_POLICY.encode())] if path == "/" or path.startswith("/static/") else []
        )

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
            route = (
                path if path in METRIC_ROUTES else "/v1/models/{model}" if path.startswith("/v1/models/") else "other"
            )
            self.server.metrics.requests.labels(route, str(status["code"])).inc()

    def check(self, scope, path: str, headers: dict[str, str]) -> None:
        """Host, declared body size and API key; the key that matched is left in scope["lmforge.api_key"]."""
        if self.hosts is not None and host_name(headers.get("host", "")) not in self.hosts:
            raise ApiError(
                400,
                "the Host header names a host this server does not answer for; start it with "
                "--allowed-hosts NAME to accept that name",
                code="invalid_host",
            )
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
                raise ApiError(
                    401,
                    "invalid or missing API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
            scope["lmforge.api_key"] = match[0]
