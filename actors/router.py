"""RouterActor: embeddings, attention, norms, gates, shared experts and lm_head; dispatch and combine.

The router holds the model without its routed experts; its MoE layers reach the expert actors through
`RemoteExperts`. Every torch step runs on one worker thread (so a compiled graph is always driven by
the thread that built it, and a placement change lands between two steps), while the actor's event
loop keeps answering statistics and health calls during a step.
"""

from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ray
import torch
from torch import Tensor

from cluster.load_stats import LoadStats
from cluster.placement import Placement
from cluster.spec import ClusterSpec
from model import DeepseekV2ForCausalLM, LatentCache
from model.sampling import Sampled

from .sequences import CacheShape, SequenceTable, StepRequest
from .transport import CompiledGraphTransport, ObjectStoreTransport, RemoteExperts


class RouterActor:
    def __init__(self, spec: dict, index: int, placement: dict):
        from cluster.graph import NAMESPACE, expert_name

        self.spec = ClusterSpec.model_validate(spec)
        self.index = index
        self.expert_actors = [
            ray.get_actor(expert_name(self.spec.name, i), namespace=NAMESPACE) for i in range(self.spec.expert_actors)
        ]
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-step")
        self._worker.submit(torch.set_num_threads, self.spec.cpu_threads_per_actor).result()
        self.model = DeepseekV2ForCausalLM.from_pretrained(self.spec.model, expert_ids=[])
        config = self.model.config
        placement_ = Placement.model_validate(placement)
        self.stats = LoadStats(config.moe_layers, config.n_routed_experts, len(self.expert_actors))
        self.objectstore = ObjectStoreTransport(self.expert_actors)
        self.compiled: CompiledGraphTransport | None = None
        self.experts = RemoteExperts(self.objectstore, placement_, self.stats)
        self.model.set_expert_backend(self.experts)
        self.cache: LatentCache | None = None
        if self.spec.transport == "compiled":
            self._on_worker(self._use_transport, "compiled")

    def _on_worker(self, fn: Callable, *args: Any) -> Any:
        return self._worker.submit(fn, *args).result()

    async def _step(self, fn: Callable, *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        self.objectstore.loop = loop
        return await loop.run_in_executor(self._worker, fn, *args)

    # ---- health and introspection -----------------------------------------------------------------
    async def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), "transport": self.transport_name}

    @property
    def transport_name(self) -> str:
        return "compiled" if self.experts.transport is self.compiled else "objectstore"

    async def describe(self) -> dict:
        return {
            "spec": self.spec.model_dump(),
            "placement": self.experts.placement.model_dump(),
            "transport": self.transport_name,
            "compiled_healthy": self.compiled is not None and self.compiled.healthy,
            "compiled_failures": 0 if self.compiled is None else self.compiled.failures,
        }

    async def get_expert_actors(self) -> list:
        return self.expert_actors

    async def load_stats(self) -> dict:
        return {**self.stats.snapshot(), "transport": self.transport_name}

    async def reset_stats(self) -> None:
        self.stats.reset()

    # ---- inference --------------------------------------------------------------------------------
    async def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        return await self._step(self._generate, prompts, max_new_tokens, sampling)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: dict) -> list[list[int]]:
        with torch.no_grad():
            return self.model.generate(prompts, max_new_tokens, **sampling)

    async def forward(self, input_ids: Tensor) -> Tensor:
        def run() -> Tensor:
            with torch.no_grad():
                return self.model(input_ids).logits

        return await self._step(run)

    # ---- serving: the paged latent cache, the running sequences and one continuous-batching step -----
    async def init_cache(self, cache_bytes: int, block_size: int) -> CacheShape:
        """Allocate this router's block pool within `cache_bytes` (the cache manager decides who owns
        which block); running sequences are forgotten."""
        dtype = next(self.model.parameters()).dtype
        bytes_per_token = LatentCache.bytes_per_token(self.model.config, dtype)
        num_blocks = cache_bytes // (block_size * bytes_per_token)
        self.cache = LatentCache(self.model.config, num_blocks, block_size, dtype=dtype)
        self.sequences = SequenceTable(self.model.config.vocab_size)
        return CacheShape(num_blocks, block_size, bytes_per_token, self.cache.nbytes)

    async def step(self, request: StepRequest) -> list[Sampled | None]:
        """Open and close sequences, then one forward over the chunks (prefill chunks and decode tokens
        together). Returns per chunk the sampled next token, or None for a chunk inside its prompt."""
        return await self._step(self._run_step, request)

    def _run_step(self, request: StepRequest) -> list[Sampled | None]:
        self.sequences.update(request.opened, request.closed)
        if not request.chunks:
            return []
        input_ids, batch = self.sequences.batch(request.chunks)
        with torch.no_grad():
            logits = self.model(input_ids, cache=self.cache, cache_batch=batch, logits_at=batch.last_tokens).logits[0]
        return self.sequences.sample(request.chunks, logits)

    async def export_blocks(self, block_ids: list[int]) -> Tensor:
        return await self._step(self.cache.export_blocks, torch.tensor(block_ids, dtype=torch.long))

    async def import_blocks(self, block_ids: list[int], data: Tensor) -> None:
        await self._step(self.cache.import_blocks, torch.tensor(block_ids, dtype=torch.long), data)

    async def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        sources, targets = (torch.tensor(column, dtype=torch.long) for column in zip(*pairs))
        await self._step(self.cache.copy_blocks, sources, targets)

    # ---- training ---------------------------------------------------------------------------------
    async def forward_backward(self, input_ids: Tensor, output_weights: Tensor) -> dict[str, Tensor]:
        """Backward of Σ logits·output_weights through the actor graph; returns the dense gradients
        (the experts' stay on their actors)."""

        def run() -> dict[str, Tensor]:
            self.model.zero_grad(set_to_none=True)
            self.model.train()
            try:
                (self.model(input_ids).logits * output_weights).sum().backward()
            finally:
                self.model.eval()
            return {n: p.grad.clone() for n, p in self.model.named_parameters() if p.grad is not None}

        return await self._step(run)

    # ---- training: next-token steps driven by jobs/trainer.py (dense params; experts step on actors) --
    async def configure_training(self, lr: float, betas: tuple[float, float], weight_decay: float,
                                 eps: float = 1e-8, dtype: str = "float32") -> None:
        from actors.training import DenseTraining

        def run() -> None:
            self.training = DenseTraining(self.model, lr, betas, weight_decay, eps, dtype)

        await self._step(run)

    async def train_step(self, input_ids: Tensor, labels: Tensor, ce_weight: float, seed: int) -> dict:
        """Forward + backward of this rank's rows; returns loss parts, load and the dense grad norm²."""
        return await self._step(self.training.forward_backward, input_ids, labels, ce_weight, seed)

    async def dense_grads(self) -> dict[str, Tensor]:
        return await self._step(self.training.grads)

    async def set_dense_grads(self, grads: dict[str, Tensor]) -> None:
        await self._step(self.training.set_grads, grads)

    async def apply_train_step(self, lr: float, grad_scale: float) -> None:
        await self._step(self.training.step, lr, grad_scale)

    async def save_dense(self, path: str) -> dict[str, int]:
        """Write the dense weights (HF names) as one safetensors file; returns name -> bytes."""
        from actors.training import save_safetensors

        return await self._step(lambda: save_safetensors(self.training.state_dict(), path))

    async def save_dense_optimizer(self, path: str) -> None:
        await self._step(self.training.save_optimizer, path)

    async def load_dense_optimizer(self, paths: list[str]) -> int:
        return await self._step(self.training.load_optimizer, paths)

    async def rng_state(self) -> Tensor:
        return await self._step(torch.get_rng_state)

    async def set_rng_state(self, state: Tensor) -> None:
        await self._step(torch.set_rng_state, state)

    # ---- transports and placement -----------------------------------------------------------------
    async def set_transport(self, name: str) -> str:
        await self._step(self._use_transport, name)
        return self.transport_name

    def _use_transport(self, name: str) -> None:
        if name not in ("compiled", "objectstore"):
            raise ValueError(f"unknown transport {name!r}")
        if name == "compiled" and self.compiled is None:
            self.compiled = CompiledGraphTransport(self.expert_actors, self.objectstore, self.spec.compiled_timeout_s)
        if name == "objectstore" and self.compiled is not None:
            # An idle compiled graph busy-polls its channels: do not keep one that is not used.
            self.compiled.teardown()
            self.compiled = None
        self.experts.transport = self.compiled if name == "compiled" else self.objectstore

    async def rebalance(self, extra_copies: int | None = None) -> dict:
        """Recompute the placement from the load measured so far and apply it between two steps."""
        extra = self.spec.extra_copies if extra_copies is None else extra_copies
        new = self.experts.placement.rebalance(self.stats.expert_load(), extra)
        await self._step(self._apply_placement, new)
        return new.model_dump()

    async def apply_placement(self, placement: dict) -> None:
        await self._step(self._apply_placement, Placement.model_validate(placement))

    def _apply_placement(self, new: Placement) -> None:
        old = self.experts.placement
        # Fetch every incoming expert before any actor drops one: set_experts may remove a source's copy.
        plans = []
        for actor_index, actor in enumerate(self.expert_actors):
            have, want = old.experts_of(actor_index), new.experts_of(actor_index)
            for layer in new.copies:
                by_source: dict[int, list[int]] = {}
                for e in sorted(set(want[layer]) - set(have[layer])):
                    by_source.setdefault(old.copies[layer][e][0], []).append(e)
                weights = [self.expert_actors[src].expert_weights.remote(layer, ids) for src, ids in by_source.items()]
                plans.append((actor, layer, sorted(set(want[layer]) & set(have[layer])), weights))
        self.objectstore.wait([ref for *_, weights in plans for ref in weights])
        updates = [actor.set_experts.remote(layer, keep, *weights) for actor, layer, keep, weights in plans]
        self.objectstore.wait(updates)
        self.experts.placement = new
        self.stats.reset()

