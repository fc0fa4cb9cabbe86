"""Serving over HTTP: the OpenAI-compatible API on the engine (app.py wires settings.py, server.py, routes.py,
streaming.py, edge.py and errors.py together), its request models (protocol.py), structured output by constrained
decoding (structured.py), /v1/classify (classify.py), the web page (static/) and the terminal chat (chat.py).
Nothing is imported here, so `import lmforge.serve.chat` does not pull in FastAPI."""
