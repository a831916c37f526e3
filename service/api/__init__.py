"""The HTTP layer and nothing else: the FastAPI app, its dependencies, the one map of errors to
status codes, the schemas, one router per resource, and the inference fast path (ASGI middleware).
The only part of the service that imports FastAPI or Starlette."""

from .app import create_app

__all__ = ["create_app"]
