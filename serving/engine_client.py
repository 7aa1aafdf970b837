"""The ingress's side of the Serve handle to the engine replica: one streaming generation."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping

from .errors import APIError, api_error
from engine.generation import EngineBatch, GenerationRequest

logger = logging.getLogger("ray.serve")


class EngineStream:
    """A streaming call to the engine replica, opened only once its first batch is known to be no error
    (so a refused request is a plain 4xx, never a broken stream). Engine exceptions become APIErrors
    through `serving.errors.ENGINE_ERRORS`; a replica that cannot be reached is a 503."""

    def __init__(self, first: EngineBatch, stream, params: Mapping[str, str]):
        self.first, self.stream, self.params, self.done = first, stream, params, False

    @classmethod
    async def open(cls, engine, request: GenerationRequest, params: Mapping[str, str]) -> "EngineStream":
        """`params`: the request parameter behind each GenerationRequest field, for error messages."""
        stream = engine.generate.options(stream=True).remote(request)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            raise APIError(500, "The engine ended the stream without a result.", "server_error") from None
        except Exception as error:
            stream.cancel()
            raise cls._error(error, params, "engine call failed") from None
        return cls(first, stream, params)

    async def __aiter__(self) -> AsyncIterator[EngineBatch]:
        try:
            batch = self.first
            while True:
                yield batch
                if batch.usage is not None:
                    self.done = True
                    return
                try:
                    batch = await self.stream.__anext__()
                except StopAsyncIteration:
                    self.done = True
                    raise APIError(500, "The engine ended the stream early.", "server_error") from None
                except Exception as error:
                    self.done = True
                    raise self._error(error, self.params, "engine stream failed") from None
        finally:
            if not self.done:
                self.stream.cancel()

    @staticmethod
    def _error(error: Exception, params: Mapping[str, str], what: str) -> APIError:
        mapped = api_error(error, params)
        if mapped is not None:
            return mapped
        logger.warning("%s: %r", what, error)  # the engine replica went away
        return APIError(503, "The engine is unavailable; try again.", "server_error", code="engine_unavailable")
