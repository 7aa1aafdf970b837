"""OpenAI-shaped errors, and the one table that turns engine and cache exceptions into them.

Both ingresses use it: HTTP answers `APIError.status` with `APIError.body()`; gRPC maps the same
status to a gRPC code (`serving.grpc_api.grpc_code`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

from pydantic import BaseModel, ValidationError

from engine.generation import (
    CacheTooSmall,
    EngineError,
    EngineFailure,
    EngineUnavailable,
    Overloaded,
    PromptTooLong,
    RateLimited,
    SessionBusy,
    SessionNotFound,
    remote_cause,
)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The body of every error answer (the OpenAPI schema publishes it)."""

    error: ErrorDetail


class APIError(Exception):
    """An error with its HTTP status and OpenAI error body: {"error": {message, type, param, code}}.
    `retry_after_s`: sent as Retry-After (whole seconds) when a retry may succeed."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.retry_after_s = retry_after_s

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


class ErrorKind(NamedTuple):
    status: int
    type: str
    code: str


# Exception type -> what the client sees. A subclass not listed gets its nearest listed base's entry.
ENGINE_ERRORS: dict[type[Exception], ErrorKind] = {
    SessionNotFound: ErrorKind(404, "invalid_request_error", "session_not_found"),
    SessionBusy: ErrorKind(409, "invalid_request_error", "session_busy"),
    PromptTooLong: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    CacheTooSmall: ErrorKind(400, "invalid_request_error", "context_length_exceeded"),
    RateLimited: ErrorKind(429, "rate_limit_error", "rate_limit_exceeded"),
    Overloaded: ErrorKind(429, "rate_limit_error", "overloaded"),
    EngineUnavailable: ErrorKind(503, "server_error", "engine_unavailable"),
    EngineFailure: ErrorKind(500, "server_error", "internal_error"),
    EngineError: ErrorKind(400, "invalid_request_error", "invalid_request"),
}


def api_error(error: BaseException, params: Mapping[str, str] | None = None) -> APIError | None:
    """The APIError for an engine or cache exception (also one that crossed Ray), or None for any other.
    `params` names the request parameter behind a GenerationRequest field (e.g. prompt_ids -> messages)."""
    error = remote_cause(error)
    kind = next((ENGINE_ERRORS[cls] for cls in type(error).__mro__ if cls in ENGINE_ERRORS), None)
    if kind is None:
        return None
    param = (params or {}).get(getattr(error, "field", None) or "")
    return APIError(kind.status, str(error) or type(error).__name__, kind.type, param, kind.code,
                    getattr(error, "retry_after_s", None))


def engine_unavailable() -> APIError:
    """The engine replica cannot be reached (restarting, or gone): the client may retry shortly."""
    return APIError(503, "The engine is unavailable; try again shortly.", "server_error", None, "engine_unavailable",
                    retry_after_s=EngineUnavailable.retry_after_s)


def unauthorized() -> APIError:
    return APIError(401, "Invalid or missing API key.", "authentication_error", None, "invalid_api_key")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "json-or-python"}


def validation_error(error: ValidationError) -> APIError:
    """A pydantic error as a 400 naming the first offending parameter."""
    first = error.errors(include_url=False)[0]
    path = []
    for part in first.get("loc", ()):
        if isinstance(part, str) and ("[" in part or part in _TYPE_TAGS or part.startswith("function-")):
            break  # pydantic names the union member that failed; the parameter is what came before
        path.append(str(part))
    param = ".".join(path) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "json_invalid":
        return APIError(400, f"The request body is not valid JSON: {message}", code="invalid_json")
    return APIError(400, f"{param}: {message}" if param else message, param=param, code="invalid_value")
