"""The OpenAPI document as the service really answers: FastAPI documents every route's 422 with
its own ``HTTPValidationError`` (``detail`` a list of error objects), but the service's handler
answers ``{"detail": "<one readable line>"}`` (``service.api.errors``), so that component is
replaced by the shape actually sent. Schema-driven clients and fuzzers (Schemathesis) then find
every error body matching its schema."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

__all__ = ["install_openapi"]

_DETAIL = {"title": "HTTPValidationError", "type": "object", "required": ["detail"],
           "description": "A request that failed validation: what was wrong, in one line.",
           "properties": {"detail": {"type": "string", "title": "Detail",
                                     "description": "Each invalid field and why."}}}


def install_openapi(app: FastAPI) -> None:
    """Make ``app.openapi()`` return the corrected document (built once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version,
                                 description=app.description, routes=app.routes)
            schemas = schema.get("components", {}).get("schemas", {})
            if "HTTPValidationError" in schemas:
                schemas["HTTPValidationError"] = _DETAIL
                schemas.pop("ValidationError", None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
