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

import contextlib
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from lmforge.apps.classifier import CLASSIFY_FILE
from lmforge.engine.loop import EngineLoop
from lmforge.infer.controls import load_controls
from lmforge.serve import adapters, classify, embeddings, errors, routes
from lmforge.serve.edge import EdgeMiddleware
from lmforge.serve.server import Server
from lmforge.serve.settings import ServeSettings
from lmforge.templates import JINJA_FILE, ChatTemplate

__all__ = ["ServeSettings", "create_app", "serve_command"]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    server: Server = app.state.server
    server.loop = EngineLoop(server.engine)
    try:
        yield
    finally:  # uvicorn runs this on SIGTERM/SIGINT after open responses end
        server.loop.close()
        server.adapters.close()  # the model's LoRA hooks go with the server


def create_app(
    model,
    tokenizer,
    settings: ServeSettings | None = None,
    model_folder: str | Path | ChatTemplate | None = None,
    draft=None,
) -> FastAPI:
    """The FastAPI app serving `model` (an lmforge Transformer) with `tokenizer`. `model_folder` is where the chat
    template is looked for (tokenizer_config.json), or the template itself (a model file's embedded one); `draft`,
    a smaller model sharing the tokenizer, turns on speculative decoding in the engine."""
    settings = settings or ServeSettings(model="")
    app = FastAPI(title="lmforge", version="1", lifespan=lifespan)
    app.state.server = server = Server(model, tokenizer, settings, model_folder, draft)
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


def load_model(path: str, settings: ServeSettings, adapter: str | None = None):
    """The model ready to serve, with its tokenizer and chat template folder (lmforge.loader.Loaded): the one place
    `serve` loads weights."""
    from lmforge.loader import load

    return load(
        path,
        dtype=settings.dtype,
        quantize=None if settings.quantize == "none" else settings.quantize,
        adapter=adapter,
        tokenizer=settings.tokenizer,
    )


def serve_command(settings: ServeSettings) -> int:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions) and a web chat."""
    import uvicorn

    settings.api_keys()  # a missing or empty key file fails now, before the model loads
    if settings.controls:
        load_controls(settings.controls)  # so does a bad controls file
    path = Path(settings.model)
    if settings.classifier is None and (path / CLASSIFY_FILE).is_file():
        settings.classifier = settings.model
    loaded = load_model(settings.model, settings, settings.adapter)
    draft = load_model(settings.draft, settings).model if settings.draft else None
    embedded = loaded.chat_template() if loaded.template_folder is None and JINJA_FILE in loaded.extras else None
    app = create_app(loaded.model, loaded.tokenizer, settings, embedded or loaded.template_folder or path.parent, draft)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0
