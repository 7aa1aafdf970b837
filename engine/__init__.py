"""The continuous-batching engine over an actor graph: what Ray Serve serves and GRPO rolls out with.

A layer of its own between cluster/ and serving/ | jobs/, because both use it and neither may import
the other."""

from .engine import Engine, EngineConfig
from .generation import (
    CacheError,
    EngineBatch,
    EngineError,
    EngineFailure,
    GenerationRequest,
    Overloaded,
    PromptTooLong,
    SessionNotFound,
    TokenEvent,
    Usage,
)

__all__ = [
    "CacheError", "Engine", "EngineBatch", "EngineConfig", "EngineError", "EngineFailure", "GenerationRequest",
    "Overloaded", "PromptTooLong", "SessionNotFound", "TokenEvent", "Usage",
]  # fmt: skip
