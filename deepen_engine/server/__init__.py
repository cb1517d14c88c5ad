"""An OpenAI-compatible HTTP server for an ensemble (`deepen serve`; the `server` extra:
Starlette and uvicorn). `create_app(ensemble)` is the ASGI app, for embedding it in your
own server.
"""

from .app import create_app

__all__ = ["create_app"]
