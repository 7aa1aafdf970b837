"""GRPO's sampler: the serving engine on the training graph's own routers and expert actors.

The engine is asynchronous (it is a Serve replica's scheduler); the job's driver is not, so the engine
runs on an event loop of its own thread and every call here waits for its result. A prompt's G
answers are one request with n = G (they share the prompt's cache blocks) and the prompt's seed.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar

import torch
from pydantic import BaseModel, ConfigDict

from cluster.graph import ActorGraph
from engine import Engine, EngineConfig, GenerationRequest, TokenEvent
from model.sampling import SamplingParams

T = TypeVar("T")


class RolloutSample(BaseModel):
    """One sampled answer with what the update needs of its rollout."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    prompt_ids: list[int]
    response_ids: list[int]
    logprobs: list[float]  # log π_θold of each response token (temperature-1 log-softmax of the logits)
    finish_reason: Literal["stop", "length"] | None
    routing: torch.Tensor  # [prompt + response − 1, MoE layers, K]: the experts of every token fed


class Rollouts:
    def __init__(self, graph: ActorGraph, config: EngineConfig, eos_token_ids: list[int]):
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="rollouts", daemon=True)
        self._thread.start()
        self._ids = itertools.count()
        # Routing is always recorded: replayed in the update, or compared with it (the mismatch rate).
        config = config.model_copy(update={"record_routing": True})
        self.engine: Engine = self._wait(Engine.create(graph, config, eos_token_ids=eos_token_ids))

    def _wait(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def sample(self, prompts: list[list[int]], n: int, max_tokens: int, sampling: list[SamplingParams]) -> list[list[RolloutSample]]:
        """n answers to each prompt (all prompts in flight together), with log-probs and routing."""

        async def everything() -> list[list[RolloutSample]]:
            return list(await asyncio.gather(*(self._answers(p, n, max_tokens, s) for p, s in zip(prompts, sampling))))

        return self._wait(everything())

    def greedy(self, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        """The greedy answer to each prompt (evaluation)."""
        params = SamplingParams(temperature=0.0, top_logprobs=0)
        return [group[0].response_ids for group in self.sample(prompts, 1, max_tokens, [params] * len(prompts))]

    async def _answers(self, prompt: list[int], n: int, max_tokens: int, sampling: SamplingParams) -> list[RolloutSample]:
        request = GenerationRequest(request_id=f"rollout-{next(self._ids)}", prompt_ids=prompt, max_tokens=max_tokens,
                                    n=n, sampling=sampling, return_routing=True)
        tokens: list[list[int]] = [[] for _ in range(n)]
        logprobs: list[list[float]] = [[] for _ in range(n)]
        finished: list[TokenEvent | None] = [None] * n
        async for event in self.engine.generate(request):
            if isinstance(event, TokenEvent):
                tokens[event.choice].append(event.token_id)
                logprobs[event.choice].append(event.logprob)
                if event.finish_reason is not None:
                    finished[event.choice] = event
        return [
            RolloutSample(prompt_ids=prompt, response_ids=tokens[i], logprobs=logprobs[i], finish_reason=end.finish_reason,
                          routing=torch.tensor(end.routing, dtype=torch.long))
            for i, end in enumerate(finished)
        ]

    def invalidate_cache(self) -> None:
        """Drop every cached prefix: after an update they hold the old policy's latents."""
        self._wait(self.engine.drop_cached_prefixes())

    def close(self) -> None:
        self._wait(self.engine.shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
