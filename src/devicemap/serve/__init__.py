"""Serving a loaded model over HTTP: the batching engine (engine.py) that decodes every
active request in one forward per step, and the OpenAI-compatible ASGI app (app.py)."""
