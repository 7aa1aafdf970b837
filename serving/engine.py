"""Continuous batching over the actor graph: admission, chunked prefill, sampling, streaming.

Every step the engine sends each router one ragged batch: one token for every decoding sequence and
prefill chunks of admitted prompts within a token budget. New requests join between steps, finished
ones leave; blocks come from the LatentKVCacheManager, which also reuses prefixes and sessions.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import ray
from pydantic import BaseModel, Field

from actors.kv_cache import CacheFull, CacheTooSmall, LatentKVCacheManager
from actors.kv_cache import SessionNotFound as _UnknownSession
from cluster.graph import NAMESPACE, ActorGraph
from model.sampling import SamplingParams

logger = logging.getLogger(__name__)


class EngineConfig(BaseModel):
    block_size: int = Field(16, ge=1)
    cache_bytes_per_router: int = Field(64 * 1024**2, gt=0)
    max_batch_tokens: int = Field(256, ge=1, description="tokens per step: decodes first, then prefill chunks")
    max_running: int = Field(64, ge=1)
    max_queue: int = Field(256, ge=1, description="requests waiting for admission before 'overloaded'")
    max_model_len: int | None = Field(None, description="None = the model's max_position_embeddings")
    host_offload_bytes: int = 64 * 1024**2
    object_store_offload_bytes: int = 64 * 1024**2
    offload_dir: str | None = None


class GenerationRequest(BaseModel):
    request_id: str
    prompt_ids: list[int] = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    n: int = Field(1, ge=1, le=16)
    sampling: SamplingParams = SamplingParams()
    stop: list[str] = []
    stop_token_ids: list[int] = []
    owner: str = ""
    session_id: str | None = None


class TokenEvent(BaseModel):
    choice: int
    token_id: int
    text: str = ""  # the text this token adds ("" without a detokenizer)
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] = []
    finish_reason: str | None = None  # "stop" | "length"


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class EngineError(Exception):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class Overloaded(EngineError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"


class PromptTooLong(EngineError):
    code = "context_length_exceeded"


class SessionNotFound(EngineError):
    status = 404
    code = "session_not_found"


class EngineFailure(EngineError):
    """A step failed on the server side: never the client's fault."""

    status = 500
    type = "server_error"
    code = "internal_error"


_DONE = object()


@dataclass
class _Choice:
    request: "_Request"
    index: int
    seq_id: str
    output: list[int] = field(default_factory=list)
    text: str = ""
    router: int = -1
    block_table: list[int] = field(default_factory=list)
    prefilled: int = -1  # prompt tokens in the cache; -1 = not admitted yet
    next_input: int | None = None  # the token sampled last step, fed this step
    done: bool = False

    @property
    def prompt(self) -> list[int]:
        return self.request.spec.prompt_ids


@dataclass
class _Request:
    spec: GenerationRequest
    queue: asyncio.Queue
    choices: list[_Choice] = field(default_factory=list)
    cached_tokens: int = 0
    finished: bool = False


class Engine:
    def __init__(self, graph: ActorGraph, manager, config: EngineConfig, max_model_len: int,
                 detokenize: Callable[[list[int]], str] | None, eos_token_ids: list[int]):
        self.graph, self.manager, self.config = graph, manager, config
        self.max_model_len = max_model_len
        self.detokenize = detokenize
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, _Request] = {}
        self.prefill_tokens = 0  # prompt tokens actually computed (the rest came from the cache)
        self.waiting: list[_Choice] = []
        self.running: list[_Choice] = []
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
        from model import DeepseekV2Config

        model_config = DeepseekV2Config.from_pretrained(graph.spec.model)
        described = await graph.routers[0].init_cache.remote(1, config.block_size)
        num_blocks = config.cache_bytes_per_router // (config.block_size * described["bytes_per_token"])
        await asyncio.gather(*(r.init_cache.remote(num_blocks, config.block_size) for r in graph.routers))
        manager = (
            ray.remote(LatentKVCacheManager)
            .options(name=f"{graph.spec.name}-kv-cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE, num_cpus=0)
            .remote(
                graph.routers,
                num_blocks,
                config.block_size,
                described["bytes_per_token"],
                config.host_offload_bytes,
                config.object_store_offload_bytes,
                config.offload_dir,
            )
        )
        max_len = min(config.max_model_len or model_config.max_position_embeddings, model_config.max_position_embeddings)
        return cls(graph, manager, config, max_len, detokenize, list(eos_token_ids))

    # ---- the public surface ---------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Usage]:
        self._validate(request)
        if request.session_id is not None:
            try:
                await self.manager.check_session.remote(request.owner, request.session_id)
            except _UnknownSession as error:
                raise SessionNotFound(str(error).splitlines()[-1]) from None
        state = _Request(request, asyncio.Queue())
        state.choices = [_Choice(state, i, f"{request.request_id}/{i}/{next(self._ids)}") for i in range(request.n)]
        self.requests[request.request_id] = state
        self.waiting.extend(state.choices)
        self._wakeup.set()
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
                self.manager.cancel.remote(choice.seq_id)
            choice.done = True
        state.queue.put_nowait(_DONE)

    async def stats(self) -> dict:
        cache, experts = await asyncio.gather(
            self.manager.stats.remote(), self.graph.routers[0].load_stats.remote()
        )
        return {
            "queue_depth": len(self.waiting),
            "running": len(self.running),
            "prefill_tokens": self.prefill_tokens,
            "cache": cache,
            "experts": experts,
        }

    @property
    def healthy(self) -> bool:
        """False once the scheduling loop has stopped (it never stops on a request's failure)."""
        return not self._loop_task.done()

    async def shutdown(self) -> None:
        self._loop_task.cancel()
        for request_id in list(self.requests):
            await self.cancel(request_id)
        ray.kill(self.manager)

    def _validate(self, request: GenerationRequest) -> None:
        if request.request_id in self.requests:
            raise EngineError(f"request id {request.request_id!r} is already running")
        total = len(request.prompt_ids) + request.max_tokens
        if len(request.prompt_ids) >= self.max_model_len:
            raise PromptTooLong(
                f"the prompt has {len(request.prompt_ids)} tokens; this model's context is {self.max_model_len}"
            )
        if total > self.max_model_len:
            raise PromptTooLong(
                f"prompt ({len(request.prompt_ids)}) + max_tokens ({request.max_tokens}) = {total} tokens "
                f"exceed this model's context of {self.max_model_len}"
            )
        if len(self.waiting) + request.n > self.config.max_queue:
            raise Overloaded(f"{len(self.waiting)} requests are waiting; try again later")

    # ---- the loop -------------------------------------------------------------------------------
    async def _loop(self) -> None:
        while True:
            try:
                await self._admit()
                if not self.running:
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                by_router: dict[int, list[_Choice]] = {}
                for choice in self.running:
                    by_router.setdefault(choice.router, []).append(choice)
                await asyncio.gather(*(self._step(router, choices) for router, choices in by_router.items()))
            except asyncio.CancelledError:
                raise
            except Exception as error:  # never let one failure stop the engine: fail the running requests
                logger.exception("engine step failed")
                for choice in list(self.running):
                    self._fail(choice.request, EngineFailure(f"internal error: {error}"))

    async def _admit(self) -> None:
        for choice in list(self.waiting):
            if len(self.running) >= self.config.max_running:
                return
            request = choice.request
            if choice.index > 0 and request.choices[0].prefilled < len(choice.prompt):
                continue  # later choices wait for choice 0's prompt blocks, then share them
            spec = request.spec
            try:
                admission = await self.manager.admit.remote(
                    choice.seq_id,
                    spec.prompt_ids,
                    spec.max_tokens,
                    spec.owner,
                    spec.session_id if choice.index == 0 else None,
                )
            except CacheFull:
                if self.running:
                    return  # wait for running requests to free blocks; keep arrival order
                self._fail(request, Overloaded("the latent cache is full; try again later"))
                continue
            except CacheTooSmall as error:
                self._fail(request, PromptTooLong(str(error).splitlines()[-1]))
                continue
            except _UnknownSession as error:
                self._fail(request, SessionNotFound(str(error).splitlines()[-1]))
                continue
            router = self.graph.routers[admission["router"]]
            if admission["restore"] is not None:
                await router.import_blocks.remote(admission["restore"]["blocks"], admission["restore"]["data"])
            if admission["copies"]:
                await router.copy_blocks.remote(admission["copies"])
            choice.router, choice.block_table = admission["router"], admission["block_table"]
            choice.prefilled = admission["cached_tokens"]
            if choice.index == 0:
                request.cached_tokens = admission["cached_tokens"]
            self.waiting.remove(choice)
            self.running.append(choice)

    async def _step(self, router: int, choices: list[_Choice]) -> None:
        budget = self.config.max_batch_tokens
        batch: list[tuple[_Choice, int]] = []
        sequences = []
        for choice in sorted(choices, key=lambda c: c.next_input is None):  # decodes first
            if choice.next_input is not None:
                tokens, start = [choice.next_input], len(choice.prompt) + len(choice.output) - 1
            else:
                if budget <= 0:
                    continue
                remaining = choice.prompt[choice.prefilled :]
                tokens, start = remaining[:budget], choice.prefilled
                self.prefill_tokens += len(tokens)
            budget -= len(tokens)
            completes_prompt = choice.next_input is not None or start + len(tokens) == len(choice.prompt)
            spec = choice.request.spec
            sequences.append(
                {
                    "tokens": tokens,
                    "start": start,
                    "block_table": choice.block_table,
                    "sample": {"params": spec.sampling.model_dump(), "output_tokens": choice.output, "choice": choice.index}
                    if completes_prompt
                    else None,
                }
            )
            batch.append((choice, len(tokens)))
        results = await self.graph.routers[router].step.remote(sequences)
        for (choice, n_tokens), result in zip(batch, results):
            if choice.done:
                continue
            if choice.next_input is None:
                choice.prefilled += n_tokens
                if choice.prefilled == len(choice.prompt):  # later arrivals (and choices 1..n-1) share it now
                    self.manager.register_prefix.remote(choice.seq_id, choice.prompt)
                    self._wakeup.set()
            if result is not None:
                self._accept(choice, result)

    def _accept(self, choice: _Choice, sampled: dict) -> None:
        spec = choice.request.spec
        token = sampled["token"]
        choice.output.append(token)
        finish = None
        text = ""
        if token in self.eos_token_ids or token in spec.stop_token_ids:
            finish = "stop"
        elif self.detokenize is not None:
            full = self.detokenize(choice.output)
            cut = min((full.find(s) for s in spec.stop if s and s in full), default=-1)
            if cut >= 0:
                full, finish = full[:cut], "stop"
            text, choice.text = full[len(choice.text) :], full
        if finish is None and (
            len(choice.output) >= spec.max_tokens or len(choice.prompt) + len(choice.output) >= self.max_model_len
        ):
            finish = "length"
        choice.request.queue.put_nowait(
            TokenEvent(
                choice=choice.index,
                token_id=token,
                text=text,
                logprob=sampled.get("logprob"),
                top_logprobs=[tuple(pair) for pair in sampled.get("top_logprobs", [])],
                finish_reason=finish,
            )
        )
        if finish is None:
            choice.next_input = token
            return
        choice.done = True
        self.running.remove(choice)
        # The last sampled token was never fed back, so the cache holds every token but that one.
        self.manager.finish.remote(choice.seq_id, (choice.prompt + choice.output)[:-1])
        request = choice.request
        if all(c.done for c in request.choices):
            request.finished = True
            self.requests.pop(spec.request_id, None)
            request.queue.put_nowait(
                Usage(
                    prompt_tokens=len(spec.prompt_ids),
                    completion_tokens=sum(len(c.output) for c in request.choices),
                    cached_tokens=request.cached_tokens,
                )
            )
            request.queue.put_nowait(_DONE)

    def _fail(self, request: _Request, error: EngineError) -> None:
        for choice in request.choices:
            if choice in self.waiting:
                self.waiting.remove(choice)
            if choice in self.running:
                self.running.remove(choice)
                self.manager.cancel.remote(choice.seq_id)
            choice.done = True
        request.finished = True
        self.requests.pop(request.spec.request_id, None)
        request.queue.put_nowait(error)
