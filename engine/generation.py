"""The engine's interface: what a generation request is, what comes back, and what can go wrong.

These cross the Serve handle between the ingress and the engine replica as they are (pydantic models
and exceptions). The exceptions know nothing of HTTP: the serving ingress maps them to status codes.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from actors.block_manager import CacheError, CacheTooSmall, SessionBusy, SessionNotFound
from model.sampling import SamplingParams

__all__ = [
    "GenerationRequest", "TokenEvent", "Usage", "EngineBatch", "EngineError", "Overloaded", "RateLimited",
    "PromptTooLong", "EngineFailure", "EngineUnavailable", "CacheError", "SessionNotFound", "SessionBusy",
    "CacheTooSmall", "remote_cause",
]


class GenerationRequest(BaseModel):
    request_id: str
    prompt_ids: list[int] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="None = the engine's default, within the context")
    n: int = Field(1, ge=1, le=16)
    sampling: SamplingParams = SamplingParams()
    stop: list[str] = []
    stop_token_ids: list[int] = []
    owner: str = ""
    session_id: str | None = None
    return_routing: bool = Field(False, description="each choice's last event carries the routing of its "
                                 "tokens (an engine made with record_routing; GRPO's routing replay)")


class TokenEvent(BaseModel):
    choice: int
    token_id: int
    text: str = ""  # the text this event adds ("" without a detokenizer, or while it may begin a stop string)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = []
    finish_reason: Literal["stop", "length"] | None = None
    # With return_routing, on the choice's last event: [token][MoE layer][k], the experts every token of
    # prompt + answer but the last was routed to as the engine computed it (the last was never fed).
    routing: list[list[list[int]]] | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class EngineBatch(BaseModel):
    """What the engine replica streams: the events since the last batch; the usage in the last one."""

    events: list[TokenEvent] = []
    usage: Usage | None = None


class EngineError(Exception):
    """The request cannot be served as it is. `retry_after_s`: when a retry may succeed (None = the
    request itself must change)."""

    retry_after_s: float | None = None


class Overloaded(EngineError):
    """Too many requests are waiting, or the cache is full with nothing running; try again later."""

    retry_after_s = 1.0


class RateLimited(Overloaded):
    """This owner (API key) sends requests faster, or keeps more of them running, than it may."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def __reduce__(self):
        return RateLimited, (str(self), self.retry_after_s)


class PromptTooLong(EngineError):
    """The prompt, or the prompt with max_tokens, does not fit this model's context. `field` names the
    part of the GenerationRequest to blame: "prompt_ids" or "max_tokens"."""

    def __init__(self, message: str, field: Literal["prompt_ids", "max_tokens"] = "prompt_ids"):
        super().__init__(message)
        self.field = field


class EngineFailure(EngineError):
    """A step failed on the server side: never the client's fault."""


class EngineUnavailable(EngineError):
    """A part of the actor graph went away (a router or the cache manager restarted) while the request
    ran, or the engine cannot be reached: the request may be sent again."""

    retry_after_s = 1.0


def remote_cause(error: BaseException) -> BaseException:
    """The exception as its actor raised it: Ray delivers it wrapped in a RayTaskError that is also an
    instance of the original class, with the remote traceback in its message; once per actor it crossed
    (the cache manager re-raises what a router raised)."""
    while (cause := getattr(error, "cause", None)) is not None and cause is not error:
        error = cause
    return error
