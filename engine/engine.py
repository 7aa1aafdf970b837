"""Continuous batching over the actor graph: admission, chunked prefill, sampling, streaming.

Every step the engine sends each router one ragged batch: one token for every decoding sequence and
prefill chunks of admitted prompts within a token budget. New requests join between steps, finished
ones leave; blocks come from the LatentKVCacheManager, which also reuses prefixes and sessions.
A sequence is opened on its router once (block table, sampling parameters), so a step carries only
its new tokens; its text is detokenized here, token by token, and cut at stop strings.

Faults: a router that Ray restarted has an empty block pool. Its running requests fail with
EngineUnavailable (the client may retry), the engine allocates a new pool and the cache manager forgets
what the router held (sessions whose blocks were there recompute their next turn from the
conversation). A cache manager that died is replaced by a new one that adopts the running sequences'
blocks, so they finish; its sessions are gone and their next turns are recomputed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import ray
from pydantic import BaseModel, Field

from actors.block_manager import Admission, CacheFull, CacheTooSmall, SessionNotFound
from actors.kv_cache import CacheManagerConfig
from actors.sequences import CacheNotAllocated, CacheShape, Chunk, OpenSequence, StepRequest
from cluster.cache_manager import start_cache_manager, stop_cache_manager
from cluster.graph import ActorGraph
from model import DeepseekV2Config
from model.sampling import Sampled

from .detokenize import ChoiceText
from .generation import (
    EngineError,
    EngineFailure,
    EngineUnavailable,
    GenerationRequest,
    Overloaded,
    PromptTooLong,
    TokenEvent,
    Usage,
    remote_cause,
)
from .limits import OwnerGate, OwnerLimits

logger = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    block_size: int = Field(16, ge=1)
    cache_bytes_per_router: int = Field(64 * 1024**2, gt=0)
    max_batch_tokens: int = Field(256, ge=1, description="tokens per step: decodes first, then prefill chunks")
    max_running: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=1, description="requests waiting for admission before 'overloaded'")
    max_model_len: int | None = Field(None, description="None = the model's max_position_embeddings")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens of a request that does not say")
    host_offload_bytes: int = Field(64 * 1024**2, ge=0)
    object_store_offload_bytes: int = Field(64 * 1024**2, ge=0)
    offload_dir: str | None = Field(None, description="disk offload folder; None = one per graph in the temp dir")
    session_idle_s: float | None = Field(1800.0, gt=0, description="sessions idle this long end; None = never")
    max_sessions_per_owner: int | None = Field(1024, ge=1, description="past it, a key's LRU idle session ends")
    owner_limits: OwnerLimits = Field(default_factory=OwnerLimits, description="per API key rate and concurrency")
    recovery_timeout_s: float = Field(120.0, gt=0, description="how long to wait for a restarted router")
    record_routing: bool = Field(False, description="the caches keep every token's experts (return_routing)")


_DONE = object()


@dataclass
class _Choice:
    request: "_Request"
    index: int
    seq_id: str
    text: ChoiceText
    output: list[int] = field(default_factory=list)
    router: int = -1
    block_table: list[int] = field(default_factory=list)
    prefilled: int = -1  # prompt tokens in the cache; -1 = not admitted yet
    next_input: int | None = None  # the token sampled last step, fed this step
    done: bool = False
    last_event: TokenEvent | None = None  # a finished choice's last event, sent by _finish

    @property
    def prompt(self) -> list[int]:
        return self.request.spec.prompt_ids


@dataclass
class _Request:
    spec: GenerationRequest
    max_tokens: int
    queue: asyncio.Queue
    choices: list[_Choice] = field(default_factory=list)
    cached_tokens: int = 0
    finished: bool = False


class Engine:
    def __init__(self, graph: ActorGraph, manager_config: CacheManagerConfig, config: EngineConfig,
                 max_model_len: int, detokenize: Callable[[list[int]], str] | None, eos_token_ids: list[int]):
        self.graph, self.config = graph, config
        self.manager_config = manager_config
        self.manager = start_cache_manager(graph, manager_config)
        self._manager_lock = asyncio.Lock()
        self.recoveries = {"router_restarts": 0, "cache_manager_restarts": 0}
        self.gate = OwnerGate(config.owner_limits)
        self.max_model_len = max_model_len
        self.detokenize = detokenize
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.prefill_tokens = 0  # prompt tokens actually computed (the rest came from the cache)
        self.waiting: list[_Choice] = []
        self.running: list[_Choice] = []
        self._to_open: dict[int, list[OpenSequence]] = {}  # per router, sent with its next step
        self._to_close: dict[int, list[str]] = {}
        self._wakeup = asyncio.Event()
        self._ids = itertools.count()
        self._loop_task = asyncio.create_task(self._loop())

    @classmethod
    async def create(
        cls,
        graph: ActorGraph,
        config: EngineConfig = EngineConfig(),
        detokenize: Callable[[list[int]], str] | None = None,
        eos_token_ids: list[int] = (),
    ) -> "Engine":
        """Allocate every router's block pool and start the graph's cache manager."""
        shapes: list[CacheShape] = await asyncio.gather(
            *(r.init_cache.remote(config.cache_bytes_per_router, config.block_size, config.record_routing)
              for r in graph.routers)
        )
        manager_config = CacheManagerConfig(
            num_blocks=shapes[0].num_blocks,
            block_size=config.block_size,
            bytes_per_token=shapes[0].bytes_per_token,
            host_offload_bytes=config.host_offload_bytes,
            object_store_offload_bytes=config.object_store_offload_bytes,
            offload_dir=config.offload_dir,
            session_idle_s=config.session_idle_s,
            max_sessions_per_owner=config.max_sessions_per_owner,
        )
        context = DeepseekV2Config.from_pretrained(graph.spec.model).max_position_embeddings
        max_len = min(config.max_model_len or context, context)
        return cls(graph, manager_config, config, max_len, detokenize, list(eos_token_ids))

    # ---- the public surface ---------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Usage]:
        """Token events as they are sampled, then the usage. A refused request raises an EngineError
        (or the cache's SessionNotFound) before the first event."""
        state = _Request(request, self._validate(request), asyncio.Queue())
        self.gate.enter(request.owner)
        try:
            if request.session_id is not None:
                await self._manager_call("check_session", request.owner, request.session_id)
            self._enqueue(state)
            try:
                while True:
                    item = await state.queue.get()
                    if item is _DONE:
                        return
                    if isinstance(item, Exception):
                        raise item
                    yield item
            finally:
                if not state.finished:  # the caller went away: free everything at once
                    await self.cancel(request.request_id)
        finally:
            self.gate.leave(request.owner)

    def _enqueue(self, state: _Request) -> None:
        request = state.spec
        state.choices = [
            _Choice(state, i, f"{request.request_id}/{i}/{next(self._ids)}", ChoiceText(self.detokenize, request.stop))
            for i in range(request.n)
        ]
        self.requests[request.request_id] = state
        self.waiting.extend(state.choices)
        self._wakeup.set()

    async def cancel(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        if state is None:
            return
        state.finished = True
        for choice in state.choices:
            if choice in self.waiting:
                self.waiting.remove(choice)
            if choice in self.running:
                self.running.remove(choice)
            if choice.prefilled >= 0 and not choice.done:
                self._release(choice)
            choice.done = True
        state.queue.put_nowait(_DONE)

    async def stats(self) -> dict:
        cache, experts = await asyncio.gather(self._manager_call("stats"), self.graph.routers[0].load_stats.remote())
        return {
            "queue_depth": len(self.waiting),
            "running": len(self.running),
            "prefill_tokens": self.prefill_tokens,
            "recoveries": dict(self.recoveries),
            "cache": cache,
            "experts": experts,
        }

    async def sessions(self, owner: str) -> list[dict]:
        return await self._manager_call("sessions_of", owner)

    async def end_session(self, owner: str, session_id: str) -> None:
        await self._manager_call("end_session", owner, session_id)

    @property
    def healthy(self) -> bool:
        """False once the scheduling loop has stopped (it never stops on a request's failure)."""
        return not self._loop_task.done()

    async def drop_cached_prefixes(self) -> int:
        """Forget every cached prefix (after the weights change: GRPO calls this after each update);
        returns the blocks freed."""
        return await self._manager_call("drop_prefixes")

    async def shutdown(self) -> None:
        self._loop_task.cancel()
        for request_id in list(self.requests):
            await self.cancel(request_id)
        await stop_cache_manager(self.manager)

    def _validate(self, request: GenerationRequest) -> int:
        """Refuse what cannot run; else the request's max_tokens (or the default, within the context).
        The one place the context length is checked."""
        if request.request_id in self.requests:
            raise EngineError(f"request id {request.request_id!r} is already running")
        prompt, limit = len(request.prompt_ids), self.max_model_len
        if prompt >= limit:
            raise PromptTooLong(f"This model's maximum context length is {limit} tokens; the prompt has {prompt}.")
        if request.max_tokens is not None and prompt + request.max_tokens > limit:
            raise PromptTooLong(
                f"This model's maximum context length is {limit} tokens; the prompt has {prompt} and max_tokens "
                f"asks for {request.max_tokens}.",
                "max_tokens",
            )
        if request.return_routing and not self.config.record_routing:
            raise EngineError("return_routing needs an engine whose caches record routing (record_routing)")
        if len(self.waiting) + request.n > self.config.max_queue:
            raise Overloaded(f"{len(self.waiting)} requests are waiting; try again later")
        return request.max_tokens or min(self.config.default_max_tokens, limit - prompt)

    # ---- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self._admit()
                if not self.running and not self._to_close:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                by_router: dict[int, list[_Choice]] = {router: [] for router in self._to_close}  # closes go out
                for choice in self.running:
                    by_router.setdefault(choice.router, []).append(choice)
                outcomes = await asyncio.gather(
                    *(self._step(router, choices) for router, choices in by_router.items()), return_exceptions=True
                )
                for router, outcome in zip(by_router, outcomes):
                    if isinstance(outcome, BaseException):
                        await self._step_failed(router, outcome)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # never let one failure stop the engine: fail the running requests
                logger.exception("engine step failed")
                for choice in list(self.running):
                    self._fail(choice.request, EngineFailure(f"internal error: {error}"))

    async def _step_failed(self, router: int, error: BaseException) -> None:
        """A router lost (restarted, or restarting) is recovered; any other failure fails its requests."""
        if isinstance(error, asyncio.CancelledError):
            raise error
        if isinstance(remote_cause(error), (CacheNotAllocated, ray.exceptions.RayActorError)):
            await self._recover_router(router)
            return
        logger.error("engine step on router %d failed: %r", router, error)
        for choice in [c for c in self.running if c.router == router]:
            self._fail(choice.request, EngineFailure(f"internal error: {error}"))

    async def _recover_router(self, router: int) -> None:
        """The router restarted with no block pool: fail what ran there (retryable), give it a new pool,
        and have the cache manager forget what it held."""
        logger.warning("router %d restarted: failing its running requests and allocating a new cache pool", router)
        for choice in [c for c in self.running if c.router == router]:
            self._fail(choice.request, EngineUnavailable(f"router {router} restarted while this request ran; "
                                                         "send it again"))
        self._to_open.pop(router, None)
        self._to_close.pop(router, None)  # the new process never opened them
        handle = self.graph.routers[router]
        await asyncio.wait_for(
            handle.init_cache.remote(self.config.cache_bytes_per_router, self.config.block_size, self.config.record_routing),
            self.config.recovery_timeout_s,
        )
        await self._manager_call("reset_router", router)
        self.recoveries["router_restarts"] += 1

    async def _manager_call(self, method: str, *args):
        """A call to the cache manager; one that died is replaced (once) and the call made again. The
        cache's own exceptions (SessionNotFound, CacheFull, ...) come out as they were raised."""
        manager = self.manager
        try:
            return await getattr(manager, method).remote(*args)
        except ray.exceptions.RayActorError:
            await self._replace_manager(manager)
        except ray.exceptions.RayTaskError as error:
            raise remote_cause(error) from None
        try:
            return await getattr(self.manager, method).remote(*args)
        except ray.exceptions.RayTaskError as error:
            raise remote_cause(error) from None

    async def _replace_manager(self, dead) -> None:
        """A new cache manager that adopts the blocks of the running sequences (so nothing running is
        handed blocks another one holds); the sessions the dead one kept are gone."""
        async with self._manager_lock:
            if self.manager is not dead:
                return  # replaced already
            logger.warning("the cache manager died: starting a new one (sessions are recomputed on their next turn)")
            self.manager = start_cache_manager(self.graph, self.manager_config)
            await self.manager.adopt.remote([(c.seq_id, c.router, c.block_table) for c in self.running])
            self.recoveries["cache_manager_restarts"] += 1

    async def _admit(self) -> None:
        for choice in list(self.waiting):
            if len(self.running) >= self.config.max_running:
                return
            request = choice.request
            if choice.index > 0 and request.choices[0].prefilled < len(choice.prompt):
                continue  # later choices wait for choice 0's prompt blocks, then share them
            spec = request.spec
            try:
                admission: Admission = await self._manager_call(
                    "admit", choice.seq_id, spec.prompt_ids, request.max_tokens, spec.owner,
                    spec.session_id if choice.index == 0 else None,
                )
            except CacheFull:
                if self.running:
                    return  # wait for running requests to free blocks; keep arrival order
                self._fail(request, Overloaded("the latent cache is full; try again later"))
                continue
            except (CacheTooSmall, SessionNotFound) as error:
                self._fail(request, error)
                continue
            except CacheNotAllocated as error:  # a restarted router: blocks the books moved are gone
                await self._recover_router(error.router)
                return
            if choice.done:  # cancelled while it was being admitted
                self.manager.cancel.remote(choice.seq_id)
                continue
            choice.router, choice.prefilled = admission.router, admission.cached_tokens
            choice.block_table = admission.block_table
            self._to_open.setdefault(admission.router, []).append(
                OpenSequence(choice.seq_id, admission.block_table, len(choice.prompt), spec.sampling, choice.index)
            )
            if choice.index == 0:
                request.cached_tokens = admission.cached_tokens
            self.waiting.remove(choice)
            self.running.append(choice)

    async def _step(self, router: int, choices: list[_Choice]) -> None:
        """One step on one router; raises what the router raised (the loop recovers a lost router)."""
        budget = self.config.max_batch_tokens
        chunks: list[Chunk] = []
        stepped: list[_Choice] = []
        for choice in sorted(choices, key=lambda c: c.next_input is None):  # decodes first
            if choice.next_input is not None:
                chunk = Chunk(choice.seq_id, [choice.next_input], len(choice.prompt) + len(choice.output) - 1)
            elif budget > 0:
                chunk = Chunk(choice.seq_id, choice.prompt[choice.prefilled : choice.prefilled + budget], choice.prefilled)
                self.prefill_tokens += len(chunk.tokens)
            else:
                continue
            budget -= len(chunk.tokens)
            chunks.append(chunk)
            stepped.append(choice)
        request = StepRequest(chunks, self._to_open.pop(router, []), self._to_close.pop(router, []))
        results: list[Sampled | None] = await self.graph.routers[router].step.remote(request)
        finished: list[_Choice] = []
        for choice, chunk, sampled in zip(stepped, chunks, results):
            if choice.done:
                continue
            if choice.next_input is None:
                choice.prefilled += len(chunk.tokens)
                if choice.prefilled == len(choice.prompt):  # later arrivals (and choices 1..n-1) share it now
                    self.manager.register_prefix.remote(choice.seq_id, choice.prompt)
                    self._wakeup.set()
            if sampled is not None and self._accept(choice, sampled):
                finished.append(choice)
        await self._finish(router, finished)

    def _accept(self, choice: _Choice, sampled: Sampled) -> bool:
        """Record the sampled token and stream its event; True when it ends the choice (its last event
        then waits in choice.last_event for _finish)."""
        request = choice.request
        token = sampled.token
        choice.output.append(token)
        if token in self.eos_token_ids or token in request.spec.stop_token_ids:
            text, finish = choice.text.finish(), "stop"  # the stop token itself adds no text
        else:
            text, stopped = choice.text.add(token)
            finish = "stop" if stopped else None
        if finish is None and len(choice.output) >= request.max_tokens:
            text, finish = text + choice.text.finish(), "length"
        event = TokenEvent(choice=choice.index, token_id=token, text=text, logprob=sampled.logprob,
                           top_logprobs=sampled.top_logprobs, finish_reason=finish)
        if finish is None:
            request.queue.put_nowait(event)
            choice.next_input = token
            return False
        choice.done, choice.last_event = True, event
        self.running.remove(choice)
        return True

    async def _finish(self, router: int, choices: list[_Choice]) -> None:
        """Send the finished choices' last events (with their routing when asked: read before their
        blocks go back), release their blocks and close them on their router."""
        asked = [c for c in choices if c.request.spec.return_routing]
        if asked:
            try:
                routings = await self.graph.routers[router].sequences_routing.remote(
                    [(c.seq_id, len(c.prompt) + len(c.output) - 1) for c in asked]
                )
            except Exception:  # the router failed: these choices end with their requests, unanswered
                for choice in choices:
                    choice.last_event = None
                    self._release(choice)
                for request in {id(c.request): c.request for c in choices}.values():
                    self._fail(request, EngineUnavailable(f"router {router} failed while this request ran"))
                raise
            for choice, routing in zip(asked, routings):
                choice.last_event.routing = routing.tolist()
        for choice in choices:
            choice.request.queue.put_nowait(choice.last_event)
            choice.last_event = None
            # The last sampled token was never fed back, so the cache holds every token but that one.
            self.manager.finish.remote(choice.seq_id, (choice.prompt + choice.output)[:-1])
            self._to_close.setdefault(choice.router, []).append(choice.seq_id)
        for request in {id(c.request): c.request for c in choices}.values():
            # Done, last event sent (another router's choices may still wait for their routing).
            if all(c.done and c.last_event is None for c in request.choices) and not request.finished:
                request.finished = True
                self.requests.pop(request.spec.request_id, None)
                request.queue.put_nowait(Usage(
                    prompt_tokens=len(request.spec.prompt_ids),
                    completion_tokens=sum(len(c.output) for c in request.choices),
                    cached_tokens=request.cached_tokens,
                ))
                request.queue.put_nowait(_DONE)

    def _release(self, choice: _Choice) -> None:
        """Give an admitted choice's blocks back and forget it on its router."""
        self.manager.cancel.remote(choice.seq_id)
        self._to_close.setdefault(choice.router, []).append(choice.seq_id)
        self._wakeup.set()

    def _fail(self, request: _Request, error: Exception) -> None:
        for choice in request.choices:
            if choice in self.waiting:
                self.waiting.remove(choice)
            if choice in self.running:
                self.running.remove(choice)
                self._release(choice)
            choice.done = True
        request.finished = True
        self.requests.pop(request.spec.request_id, None)
        request.queue.put_nowait(error)

