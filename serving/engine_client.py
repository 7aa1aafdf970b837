"""The ingress's side of the Serve handle to the engine replica: one streaming generation."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence

from .errors import APIError, api_error
from engine.generation import EngineBatch, GenerationRequest, Usage

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

    @classmethod
    async def open_all(cls, engine, requests: Sequence[GenerationRequest],
                       params: Mapping[str, str]) -> list["EngineStream"]:
        """`open` for each request at once; if any is refused, the others are closed and its error raised."""
        opened = await asyncio.gather(*(cls.open(engine, r, params) for r in requests), return_exceptions=True)
        refused = [o for o in opened if isinstance(o, BaseException)]
        if refused:
            for stream in opened:
                if isinstance(stream, EngineStream):
                    stream.close()
            raise refused[0]
        return opened

    def close(self) -> None:
        """Cancel the generation unless it has ended."""
        if not self.done:
            self.done = True
            self.stream.cancel()

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


async def merged(streams: Sequence[EngineStream]) -> AsyncIterator[tuple[int, EngineBatch]]:
    """The batches of several streams as they arrive, each with its stream's position in `streams`. An
    error in one stream ends them all and is raised here; so does leaving the loop early."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(position: int, stream: EngineStream) -> None:
        try:
            async for batch in stream:
                queue.put_nowait((position, batch))
        except APIError as error:
            queue.put_nowait((position, error))
        queue.put_nowait((position, None))

    pumps = [asyncio.create_task(pump(position, stream)) for position, stream in enumerate(streams)]
    try:
        running = len(pumps)
        while running:
            position, item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, APIError):
                raise item
            else:
                yield position, item
    finally:
        for task in pumps:
            task.cancel()
        for stream in streams:
            stream.close()


def total_usage(usages: Sequence[Usage]) -> Usage:
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
        cached_tokens=sum(u.cached_tokens for u in usages),
    )
