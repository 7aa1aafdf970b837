"""The ingress's side of the Serve handle to the engine replica: one streaming generation, other calls,
and whether the replica answers at all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from ray.serve.exceptions import RequestCancelledError

from .errors import APIError, api_error, engine_unavailable
from engine.generation import EngineBatch, GenerationRequest, Usage

logger = logging.getLogger("ray.serve")


class EngineWatch:
    """Whether the engine replica answers a cheap call, asked once a second while calls wait for its
    answer or it is down (never while idle). While it does not answer (Serve is restarting it), requests
    are answered 503 with Retry-After at once, and calls still waiting (a stream's first batch, stats,
    sessions) give up with the same answer rather than hang until the new replica is up."""

    def __init__(self, engine, interval_s: float = 1.0, timeout_s: float = 3.0):
        self.engine, self.interval_s, self.timeout_s = engine, interval_s, timeout_s
        self.up = True
        self.waiting = 0  # calls waiting for the replica's answer
        self._down = asyncio.Event()
        self._prober: asyncio.Task | None = None

    def probe(self) -> None:
        """Start asking, unless already asking."""
        if self._prober is None or self._prober.done():
            self._prober = asyncio.get_running_loop().create_task(self._probe())

    async def _probe(self) -> None:
        while self.waiting or not self.up:
            try:
                await asyncio.wait_for(self.engine.check_health.remote(), self.timeout_s)
                self._set(True)
            except asyncio.CancelledError:
                raise
            except Exception:
                self._set(False)
            await asyncio.sleep(self.interval_s)

    def _set(self, up: bool) -> None:
        if up == self.up:
            return
        logger.warning("moeray: the engine replica %s", "answers again" if up else "does not answer")
        self.up = up
        if up:
            self._down = asyncio.Event()  # for the next outage
        else:
            self._down.set()

    def mark_down(self) -> None:
        """A call found the replica gone; the probe says when it is back."""
        self._set(False)
        self.probe()

    def check(self) -> None:
        if not self.up:
            raise engine_unavailable()

    async def unless_down(self, call: Awaitable, on_outage: Callable[[], None] = lambda: None):
        """The result of a call to the engine replica, unless the replica is found down first: then
        `on_outage()` and a 503. (A call to a replica that died waits, in Serve, for the next one.)"""
        self.check()
        answer, outage = asyncio.ensure_future(call), asyncio.ensure_future(self._down.wait())
        self.waiting += 1
        self.probe()
        try:
            await asyncio.wait({answer, outage}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.waiting -= 1
            outage.cancel()
        if not answer.done():
            answer.cancel()
            on_outage()
            raise engine_unavailable()
        return answer.result()

    async def call(self, method: str, *args):
        """A unary call to the engine replica; its errors as APIErrors."""
        try:
            return await self.unless_down(getattr(self.engine, method).remote(*args))
        except APIError:
            raise
        except Exception as error:
            raise self.error(error, {}, method) from None

    def error(self, error: Exception, params: Mapping[str, str], what: str) -> APIError:
        """An engine exception through `serving.errors.ENGINE_ERRORS`; anything else means the replica
        could not be reached: 503. A call cancelled because its client went away says nothing about the
        replica: it is a cancellation here too."""
        if isinstance(error, RequestCancelledError):
            raise asyncio.CancelledError() from error
        mapped = api_error(error, params)
        if mapped is not None:
            return mapped
        logger.warning("%s: %r", what, error)
        self.mark_down()
        return engine_unavailable()


class EngineStream:
    """A streaming call to the engine replica, opened only once its first batch is known to be no error
    (so a refused request is a plain 4xx, never a broken stream)."""

    def __init__(self, first: EngineBatch, stream, params: Mapping[str, str], watch: EngineWatch):
        self.first, self.stream, self.params, self.watch, self.done = first, stream, params, watch, False

    @classmethod
    async def open(cls, watch: EngineWatch, request: GenerationRequest, params: Mapping[str, str]) -> "EngineStream":
        """`params`: the request parameter behind each GenerationRequest field, for error messages."""
        watch.check()
        stream = watch.engine.generate.options(stream=True).remote(request)
        try:
            first = await watch.unless_down(stream.__anext__(), on_outage=stream.cancel)
        except APIError:
            raise
        except StopAsyncIteration:
            raise APIError(500, "The engine ended the stream without a result.", "server_error") from None
        except Exception as error:
            stream.cancel()
            raise watch.error(error, params, "engine call failed") from None
        return cls(first, stream, params, watch)

    @classmethod
    async def open_all(cls, watch: EngineWatch, requests: Sequence[GenerationRequest],
                       params: Mapping[str, str]) -> list["EngineStream"]:
        """`open` for each request at once; if any is refused, the others are closed and its error raised."""
        opened = await asyncio.gather(*(cls.open(watch, r, params) for r in requests), return_exceptions=True)
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
                    raise self.watch.error(error, self.params, "engine stream failed") from None
        finally:
            if not self.done:
                self.stream.cancel()


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
