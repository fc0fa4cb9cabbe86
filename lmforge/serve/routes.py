"""The HTTP routes: OpenAI's /v1 API, tokenization, and the operator's /health, /metrics and web page.

Module-level handlers on one `APIRouter`; each reaches the served model through the `ServerDep` dependency
(`request.app.state.server`), so a route is a plain function of its request. A generation route reads top to
bottom: check the model, make the prompts and SamplingParams (protocol.py, server.py), attach the output format
and controls, take an admission slot, submit to the engine, and hand the streams to a `Reply` (streaming.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lmforge.serve.errors import ApiError
from lmforge.serve.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from lmforge.serve.server import Server
from lmforge.serve.streaming import ChatShape, CompletionShape, Reply
from lmforge.serve.tool_reply import ToolChatShape
from lmforge.serve.tools import tool_format, tool_request

STATIC_DIR = Path(__file__).parent / "static"


def get_server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(get_server)]
router = APIRouter()


# ---------------------------------------------------------------------------------- generation


@router.post("/v1/completions")
async def completions(req: CompletionRequest, http: Request, server: ServerDep):
    adapter = server.check_model(req.model)
    prompts = await server.prompts(req.prompt, req.n or 1)
    params = req.to_sampling_params(
        server.max_tokens(req.max_tokens, max(map(len, prompts)), 16, "max_tokens", "prompt")
    )
    constraint = await server.attach_constraint(req, params)
    guard = server.attach_controls(params, req.banned_phrases)
    slot = server.admit(http.scope["lmforge.api_key"], prompts, params)
    streams = server.submit(prompts, params, slot, adapter)
    echo = [server.tokenizer.decode(p) for p in prompts] if req.echo else None
    reply = Reply(
        server,
        http,
        CompletionShape(server, echo),
        streams,
        slot,
        params.n,
        sum(map(len, prompts)),
        guard,
        constraint,
        adapter,
    )
    if req.stream:
        return reply.stream(bool(req.stream_options and req.stream_options.include_usage))
    return await reply.whole()


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, http: Request, server: ServerDep):
    adapter = server.check_model(req.model)
    server.check_size(1, req.n or 1)
    tools = tool_request(req.tools, req.tool_choice, req.parallel_tool_calls)
    answers_calls = tools is not None and tools.choice != "none"  # the answer may be tool calls
    fmt = tool_format(server.template.source, server.template.is_default) if answers_calls else None
    prompt = await server.chat_prompt(req.messages, tools)
    params = req.to_sampling_params(
        server.max_tokens(
            req.requested_max_tokens(),
            len(prompt),
            None,
            "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens",
            "messages",
        )
    )
    constraint = await server.attach_constraint(req, params, tools)
    if constraint is None:  # a constrained output ends by its format, not by a turn marker
        params.stop += [s for s in server.template.turn_stops if s not in params.stop]
    guard = server.attach_controls(params, req.banned_phrases)
    slot = server.admit(http.scope["lmforge.api_key"], [prompt], params)
    streams = server.submit([prompt], params, slot, adapter)
    shape = ToolChatShape(server, tools, fmt) if tools is not None and fmt is not None else ChatShape(server)
    reply = Reply(server, http, shape, streams, slot, params.n, len(prompt), guard, constraint, adapter)
    if req.stream:
        return reply.stream(bool(req.stream_options and req.stream_options.include_usage))
    return await reply.whole()


# ---------------------------------------------------------------------------------- models and tokens


@router.get("/v1/models")
async def models(server: ServerDep):
    return {"object": "list", "data": server.model_cards()}


@router.get("/v1/models/{model}")
async def retrieve_model(model: str, server: ServerDep):
    return server.model_card(server.check_model(model))


@router.post("/tokenize")
async def tokenize(req: TokenizeRequest, server: ServerDep):
    server.check_model(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(400, "give exactly one of prompt or messages", "prompt")
    if req.prompt is not None:
        tokens = await server.encode(req.prompt, "prompt")
    else:
        tokens = await server.encode(await server.render(req.messages), "messages")
    return {"tokens": tokens, "count": len(tokens), "max_model_len": server.max_model_len}


@router.post("/detokenize")
async def detokenize(req: DetokenizeRequest, server: ServerDep):
    server.check_model(req.model)
    vocab = server.tokenizer.vocab_size
    bad = [t for t in req.tokens if not 0 <= t < vocab]
    if bad:
        raise ApiError(400, f"token id {bad[0]} is outside the vocabulary 0..{vocab - 1}", "tokens")
    return {"prompt": server.tokenizer.decode(req.tokens)}


# ---------------------------------------------------------------------------------- the operator's routes


@router.get("/health")
async def health(server: ServerDep):
    loop = server.loop
    ok = loop is not None and loop.alive
    body = {
        "status": "ok" if ok else "error",
        "model": server.settings.model_name,
        "active_requests": server.active,
        "active_sequences": server.sequences,
        "max_sequences": server.max_sequences,
        "speculative": server.settings.draft is not None,
        "engine": loop.last_stats if loop else None,
        "engine_pid": getattr(loop, "pid", None),  # the engine's own process (--engine process), if it has one
    }
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(server: ServerDep):
    return PlainTextResponse(server.metrics.scrape(server.loop.last_stats), media_type=CONTENT_TYPE_LATEST)


@router.get("/", include_in_schema=False)
async def index(server: ServerDep):
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page)
    return HTMLResponse(
        "<!doctype html><title>lmforge</title><p>lmforge is serving "
        f"{server.settings.model_name}: POST /v1/chat/completions.</p>"
    )
