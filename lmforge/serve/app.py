"""The OpenAI-compatible HTTP server: the app's wiring, and the `lmforge serve` command.

The rooms: settings.py (every setting, once), server.py (the served model's state and how a request becomes
engine inputs), routes.py (the handlers), streaming.py (engine outputs -> whole answers or server-sent events),
edge.py (Host check, body limit, API keys, rate limit, metrics, security headers), errors.py (OpenAI's error
JSON), protocol.py (request models), structured.py (output formats -> token masks), tools.py and tool_reply.py
(tool calling), embeddings.py (/v1/embeddings), adapters.py (loading LoRA adapters at run time), classify.py
(/v1/classify).
`create_app` only puts them together; the engine loop runs while the app's lifespan does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from lmforge.apps.classifier import CLASSIFY_FILE
from lmforge.engine.engine import Engine
from lmforge.infer.controls import load_controls
from lmforge.serve import adapters, classify, embeddings, errors, routes
from lmforge.serve.edge import EdgeMiddleware
from lmforge.serve.server import Server, build_engine
from lmforge.serve.settings import ServeSettings
from lmforge.templates import JINJA_FILE, ChatTemplate

__all__ = ["ServeSettings", "create_app", "engine_from_settings", "serve_command"]

log = logging.getLogger("lmforge.serve")


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    server: Server = app.state.server
    server.loop = await asyncio.to_thread(server.start_engine, app.state.on_engine_exit)
    if app.state.yield_to_engine:
        yield_to_engine()
    try:
        yield
    finally:  # uvicorn runs this on SIGTERM/SIGINT after open responses end
        server.close_engine()


def create_app(
    model,
    tokenizer,
    settings: ServeSettings | None = None,
    model_folder: str | Path | ChatTemplate | None = None,
    draft=None,
    engine_process: Callable[[], Engine] | None = None,
    on_engine_exit: Callable[[], None] | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` (an lmforge Transformer) with `tokenizer`. `model_folder` is where the chat
    template is looked for (tokenizer_config.json), or the template itself (a model file's embedded one); `draft`,
    a smaller model sharing the tokenizer, turns on speculative decoding in the engine. With `engine_process` (a
    picklable callable building the engine, e.g. functools.partial(engine_from_settings, settings)) the engine
    runs in its own process and `model` only lends its config; `on_engine_exit` is called if that process dies."""
    settings = settings or ServeSettings(model="")
    app = FastAPI(title="lmforge", version="1", lifespan=lifespan)
    app.state.server = server = Server(model, tokenizer, settings, model_folder, draft, engine_process)
    app.state.on_engine_exit = on_engine_exit
    app.state.yield_to_engine = False  # lmforge serve's own process turns it on
    app.state.classifier = None
    if settings.classifier:
        app.state.classifier = classify.ClassifierService(settings.classifier, (settings.model_name,))
    errors.install(app)
    app.add_middleware(EdgeMiddleware, server=server)
    app.include_router(routes.router)
    app.include_router(embeddings.router)
    app.include_router(adapters.router)
    app.include_router(classify.router)
    app.mount("/static", StaticFiles(directory=routes.STATIC_DIR, check_dir=False), name="static")
    return app


def load_model(path: str, settings: ServeSettings, adapter: str | None = None, ready: bool = True):
    """The model ready to serve, with its tokenizer and chat template folder (lmforge.loader.Loaded): the one place
    `serve` loads weights. ready=False leaves the weights as stored (no dtype change, quantization or decoding
    preparation): for a process that needs only the model's config, tokenizer and template."""
    from lmforge.loader import load

    return load(
        path,
        dtype=settings.dtype if ready else None,
        quantize=None if settings.quantize == "none" or not ready else settings.quantize,
        adapter=adapter,
        prepare=ready,
        tokenizer=settings.tokenizer,
    )


HTTP_NICE = 5  # how far the HTTP layer's threads stand back from the engine's


def yield_to_engine() -> None:
    """Lower the priority of this thread (the event loop) and of the threads it starts later, not the engine's.

    On a machine with as many cores as the engine has threads, the HTTP work and the step compete for them, and a
    step's threads meet at every parallel region: one of them preempted by the event loop holds up the other, so
    each millisecond of HTTP work cost the engine a millisecond of both cores. Niced, the event loop runs where the
    engine leaves a core free (between and inside steps) and still gets its share under full load (Linux: the
    nice value is per thread; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        os.nice(HTTP_NICE)


def engine_from_settings(settings: ServeSettings) -> Engine:
    """The engine `lmforge serve` runs, built from its settings alone: what its own process calls
    (lmforge.engine.remote), loading the model there."""
    loaded = load_model(settings.model, settings, settings.adapter)
    draft = load_model(settings.draft, settings).model if settings.draft else None
    return build_engine(loaded.model, loaded.tokenizer, settings, draft)


def serve_command(settings: ServeSettings) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) and a web chat."""
    import uvicorn

    settings.api_keys()  # a missing or empty key file fails now, before the model loads
    if settings.controls:
        load_controls(settings.controls)  # so does a bad controls file
    path = Path(settings.model)
    if settings.classifier is None and (path / CLASSIFY_FILE).is_file():
        settings.classifier = settings.model
    in_process = settings.engine == "thread"
    loaded = load_model(settings.model, settings, settings.adapter, ready=in_process)  # else the engine's loads it
    draft = load_model(settings.draft, settings).model if settings.draft and in_process else None
    embedded = loaded.chat_template() if loaded.template_folder is None and JINJA_FILE in loaded.extras else None
    server = uvicorn.Server(uvicorn.Config(None, host=settings.host, port=settings.port, log_level=settings.log_level))
    lost = threading.Event()

    def on_engine_exit() -> None:  # the engine process died: stop serving, exit non-zero (a supervisor restarts)
        lost.set()
        server.should_exit = True

    app = create_app(
        loaded.model,
        loaded.tokenizer,
        settings,
        embedded or loaded.template_folder or path.parent,
        draft,
        engine_process=None if in_process else functools.partial(engine_from_settings, settings),
        on_engine_exit=on_engine_exit,
    )
    app.state.yield_to_engine = True
    server.config.app = app
    del loaded, draft  # with the engine in its own process, this one keeps the tokenizer and config only
    gc.collect()
    server.run()
    if lost.is_set():
        log.error("the engine process died; the server stopped")
        return 1
    return 0
