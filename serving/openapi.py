"""The OpenAPI schema the ingress publishes at /openapi.json.

The routes read their bodies themselves (to bound their size and answer OpenAI-shaped errors), so
FastAPI cannot see them: each route says here what it really reads (the pydantic request model it
validates with, the X-Session-Id header, the key) and what it answers on error.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .errors import ErrorResponse
from .schemas import ChatCompletionRequest, CompletionRequest
from .sessions import SESSION_ID_PATTERN

SCHEMAS = "#/components/schemas/"
SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "Authorization: Bearer <API key>"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-Api-Key"},
}
_ERROR = {"description": "an OpenAI-shaped error", "content": {"application/json": {"schema": {"$ref": SCHEMAS + "ErrorResponse"}}}}
_RETRY_HEADERS = {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}}


def documented(body: type[BaseModel] | None = None, session_header: bool = False,
               authenticated: bool = True) -> dict[str, Any]:
    """FastAPI route options (`openapi_extra`) for what a handler reads and how it fails."""
    statuses = {"400": _ERROR, "404": _ERROR}
    if authenticated:
        statuses["401"] = _ERROR
    if body is not None:
        statuses.update({"413": _ERROR, "429": {**_ERROR, "headers": _RETRY_HEADERS}})
    extra: dict[str, Any] = {"responses": {**statuses, "503": {**_ERROR, "headers": _RETRY_HEADERS}}}
    if authenticated:
        extra["security"] = [{"bearer": []}, {"apiKey": []}]
    if body is not None:
        extra["requestBody"] = {
            "required": True, "content": {"application/json": {"schema": {"$ref": SCHEMAS + body.__name__}}},
        }
    if session_header:
        extra["parameters"] = [{
            "name": "X-Session-Id", "in": "header", "required": False,
            "description": "the session to continue (or the session_id field)",
            "schema": {"type": "string", "pattern": SESSION_ID_PATTERN},
        }]
    return {"openapi_extra": extra}


def install_openapi(app: FastAPI) -> None:
    """FastAPI's schema of the routes, plus the request and error models and the security schemes."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                 description="OpenAI-compatible DeepSeek-V2 MoE serving on Ray")
            _, definitions = models_json_schema(
                [(CompletionRequest, "validation"), (ChatCompletionRequest, "validation"),
                 (ErrorResponse, "serialization")],
                ref_template=SCHEMAS + "{model}",
            )
            components = schema.setdefault("components", {})
            # FastAPI's own 422 answer to path parameters is never sent: every error is a 400 ErrorResponse.
            for operation in (op for path in schema["paths"].values() for op in path.values()):
                operation["responses"].pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                components.get("schemas", {}).pop(name, None)
            components.setdefault("schemas", {}).update(definitions["$defs"])
            components["securitySchemes"] = SECURITY_SCHEMES
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
