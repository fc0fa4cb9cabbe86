"""Serving over HTTP: the OpenAI-compatible API on the engine (app.py), its request models (protocol.py), chat
templates (templates.py), structured output by constrained decoding (structured.py), the web page (static/) and
the terminal chat (chat.py). Nothing is imported here, so `import lmforge.serve.chat` does not pull in FastAPI."""
