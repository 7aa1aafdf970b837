"""RouterActor: embeddings, attention, norms, gates, shared experts and lm_head; dispatch and combine.

The router holds the model without its routed experts; its MoE layers reach the expert actors through
`RemoteExperts`. Every torch step runs on one worker thread (so a compiled graph is always driven by
the thread that built it, and a placement change lands between two steps), while the actor's event
loop keeps answering statistics and health calls during a step.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import ray
import torch
from pydantic import BaseModel, Field
from torch import Tensor

from model import DeepseekV2ForCausalLM, LatentCache, LocalExperts
from model.checkpoint import write_shard
from model.grpo import GRPOSettings, PolicyBatch, PolicyParts, policy_backward, policy_logprobs
from model.sampling import Sampled
from model.training import (
    AdamWSettings,
    NamedAdamW,
    OptimizerUpdate,
    ReferenceWeights,
    StepParts,
    clip_scale,
    dense_parameters,
    dense_state_dict,
    next_token_backward,
)

from .cpu_affinity import PinnedCores
from .data_parallel import DataParallelGroup, GradientAverager, rendezvous_address
from .devices import ComputeDtype, actor_device, compute_dtype, where_this_computes
from .load_stats import LoadStats
from .placement import Placement
from .sequences import CacheNotAllocated, CacheShape, SequenceTable, StepRequest
from .transports import TRANSPORTS, ExpertTransport, RemoteExperts, TransportSettings
from .transports.objectstore import MESSAGE_ROUTES, ObjectStoreTransport


class RouterSettings(BaseModel):
    transport: str = "socket"
    transport_settings: TransportSettings = TransportSettings()
    cpu_threads: int = Field(1, ge=1, description="torch threads of the step thread")
    dtype: ComputeDtype = Field("auto", description="dense weights and latent cache: auto = bf16 on a GPU, fp32 on CPU")
    extra_copies: int = Field(0, ge=0, description="copies of hot experts per MoE layer that `rebalance` adds")
    pin_cores: bool = Field(False, description="its graph pins its processes (a restarted router pins itself again)")


class RouterActor:
    def __init__(
        self,
        model_dir: str,
        index: int,
        expert_actor_names: list[str],
        namespace: str,
        placement: Placement,
        settings: RouterSettings,
        graph_spec: dict | None = None,
    ):
        """`expert_actor_names`: the expert actors in actor-index order, found by name rather than passed
        as handles (Ray cannot restart an actor whose constructor arguments hold object references).
        `graph_spec`: what built this graph, handed back by `describe` to drivers that attach later."""
        self.index = index
        self.expert_actors = [ray.get_actor(name, namespace=namespace) for name in expert_actor_names]
        self.settings = settings
        self.graph_spec = graph_spec or {}
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="router-step")
        self._worker.submit(torch.set_num_threads, settings.cpu_threads).result()
        self.model_dir = model_dir
        self.device = actor_device()
        self.dtype = compute_dtype(settings.dtype, self.device)
        self.model = DeepseekV2ForCausalLM.from_pretrained(model_dir, self.dtype, self.device, expert_ids=[])
        config = self.model.config
        self.stats = LoadStats(config.moe_layers, config.n_routed_experts, len(self.expert_actors))
        self.cores = PinnedCores(settings.cpu_threads, self.device)  # claimed when the graph pins its processes
        if settings.pin_cores:
            self.cores.pin_if_restarted()
        self.objectstore = ObjectStoreTransport(self.expert_actors, settings.transport_settings, self.device)
        self.experts = RemoteExperts(self.objectstore, placement, self.stats, settings.cpu_threads)
        self.model.set_expert_backend(self.experts)
        self.cache: LatentCache | None = None
        self.sequences: SequenceTable | None = None  # the running sequences, once init_cache made a pool
        self.dense_optimizer: NamedAdamW | None = None  # set by configure_training
        self.averager: GradientAverager | None = None  # of the dense gradients over the ranks; with the optimizer
        self.reference: ReferenceWeights | None = None  # set by configure_reference (GRPO with β > 0)
        self.data_parallel = DataParallelGroup()  # this rank alone until init_data_parallel
        self.train_dtype = "float32"
        self._on_worker(self._use_transport, settings.transport)
        idle_release_s = settings.transport_settings.idle_release_s
        if idle_release_s is not None:
            threading.Thread(target=self._release_idle_transport, args=(idle_release_s / 4,), daemon=True,
                             name="router-idle-release").start()  # fmt: skip

    def _release_idle_transport(self, every_s: float) -> None:
        """Has the step thread look, between two steps, whether the live transport has been idle long
        enough to let go of what spins (a compiled graph's readers)."""
        while True:
            time.sleep(every_s)
            try:
                looked = self._worker.submit(lambda: self.experts.transport.release_if_idle())
            except RuntimeError:  # the interpreter is exiting: no steps any more
                return
            looked.result()

    def _on_worker(self, fn: Callable, *args: Any) -> Any:
        return self._worker.submit(fn, *args).result()

    async def _step(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._worker, fn, *args)

    # ---- health and introspection -----------------------------------------------------------------
    async def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), **where_this_computes(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "torch_threads": self.settings.cpu_threads,
                "cores": self.cores.cores,  # where its threads are held; None = wherever the kernel puts them
                "cpu_s": time.process_time(),  # CPU seconds of all its threads so far
                "transport": self.transport_name}  # fmt: skip

    @property
    def transport_name(self) -> str:
        return self.experts.transport.name

    async def describe(self) -> dict:
        transport = self.experts.transport
        return {
            "graph_spec": self.graph_spec,
            "placement": self.experts.placement.model_dump(),
            "transport": transport.name,
            "transport_healthy": transport.healthy,
            "transport_released": transport.released,
            "transport_failures": transport.failures,
            "messages": {route: 0 for route in MESSAGE_ROUTES} | dict(self.objectstore.sent),
        }

    async def get_expert_actors(self) -> list:
        return self.expert_actors

    async def pin_to_cores(self) -> list[int] | None:
        """Holds this router's threads on cores of its own if it computes on the CPU (actors/cpu_affinity.py)."""
        return self.cores.pin()

    async def load_stats(self) -> dict:
        """Tokens per expert, per expert actor and per node (where each actor lives now: a restarted
        actor may have moved), imbalance and actors reached per token, for every MoE layer."""
        replies = await asyncio.gather(*(actor.ready.remote() for actor in self.expert_actors))
        nodes = [reply["node_id"] for reply in replies]
        return {**self.stats.snapshot(nodes), "transport": self.transport_name}

    async def reset_stats(self) -> None:
        self.stats.reset()

    async def profile_dispatch(self, batch_sizes: list[int], warmup: int, iters: int) -> list[dict]:
        """One MoE layer's round trip as this router's step thread sees it, over the live transport and
        over in-process experts (all of the layer's, loaded here for the comparison): per batch size and
        backend, the round trip of each iteration in nanoseconds. Tokens come from random hidden states
        through the layer's real gate, grouped by expert as the MoE layer does."""
        return await self._step(self._profile_dispatch, batch_sizes, warmup, iters)

    def _profile_dispatch(self, batch_sizes: list[int], warmup: int, iters: int) -> list[dict]:
        moe = next(iter(self.model.moe_layers().values()))
        layer, n_experts = moe.layer_idx, moe.n_experts
        local = LocalExperts.from_pretrained(
            self.model_dir, self.model.config, {layer: list(range(n_experts))}, self.dtype, self.device
        )
        backends = {"local": local, self.transport_name: self.experts}
        generator = torch.Generator().manual_seed(0)
        results = []
        with torch.no_grad():
            for batch in batch_sizes:
                messages = []
                for _ in range(16):
                    x = torch.randn(batch, self.model.config.hidden_size, generator=generator).to(self.device, self.dtype)
                    expert_of = moe.gate(x).expert_ids.flatten()
                    token_of = torch.arange(batch).repeat_interleave(len(expert_of) // batch)
                    token_of = token_of[expert_of.argsort(stable=True)]
                    messages.append((x[token_of], torch.bincount(expert_of, minlength=n_experts).tolist(), token_of))
                samples: dict[str, list[int]] = {name: [] for name in backends}
                for i in range(warmup + iters):
                    tokens, counts, token_of = messages[i % len(messages)]
                    for name, backend in backends.items():
                        start = time.perf_counter_ns()
                        backend.submit(layer, tokens, counts, token_of, False).result()
                        samples[name].append(time.perf_counter_ns() - start)
                results += [{"backend": name, "batch": batch, "round_trip_ns": values[warmup:]}
                            for name, values in samples.items()]  # fmt: skip
        self.stats.reset()
        return results

    # ---- inference --------------------------------------------------------------------------------
    async def generate(self, prompts: list[list[int]], max_new_tokens: int, **sampling: Any) -> list[list[int]]:
        return await self._step(self._generate, prompts, max_new_tokens, sampling)

    def _generate(self, prompts: list[list[int]], max_new_tokens: int, sampling: dict) -> list[list[int]]:
        with torch.no_grad():
            return self.model.generate(prompts, max_new_tokens, **sampling)

    # ---- serving: the paged latent cache, the running sequences and one continuous-batching step -----
    async def init_cache(self, cache_bytes: int, block_size: int, record_routing: bool = False) -> CacheShape:
        """Allocate this router's block pool within `cache_bytes` (the cache manager decides who owns
        which block); running sequences are forgotten. record_routing: every cached token also keeps
        the experts it was routed to (GRPO's routing replay reads them with `sequences_routing`)."""
        bytes_per_token = LatentCache.bytes_per_token(self.model.config, self.dtype)
        num_blocks = cache_bytes // (block_size * bytes_per_token)
        self.cache = LatentCache(self.model.config, num_blocks, block_size, dtype=self.dtype, device=self.device,
                                 record_routing=record_routing)
        self.sequences = SequenceTable(self.model.config.vocab_size, self.device)
        return CacheShape(num_blocks, block_size, bytes_per_token, self.cache.nbytes)

    async def step(self, request: StepRequest) -> list[Sampled | None]:
        """Open and close sequences, then one forward over the chunks (prefill chunks and decode tokens
        together). Returns per chunk the sampled next token, or None for a chunk inside its prompt."""
        return await self._step(self._run_step, request)

    def _pool(self) -> LatentCache:
        if self.cache is None:
            raise CacheNotAllocated(self.index)
        return self.cache

    def _run_step(self, request: StepRequest) -> list[Sampled | None]:
        cache = self._pool()
        self.sequences.update(request.opened, request.closed)
        if not request.chunks:
            return []
        input_ids, batch = self.sequences.batch(request.chunks)
        with torch.no_grad():
            logits = self.model(input_ids, cache=cache, cache_batch=batch, logits_at=batch.last_tokens).logits[0]
        return self.sequences.sample(request.chunks, logits)

    async def sequences_routing(self, sequences: list[tuple[str, int]]) -> list[Tensor]:
        """For each (seq_id, length) of running sequences: [length, MoE layers, K], the experts each of
        its first `length` cached tokens was routed to (a cache made with record_routing)."""

        def read() -> list[Tensor]:
            return [self._pool().read_routing(self.sequences.running[seq].block_table, n).cpu() for seq, n in sequences]

        return await self._step(read)

    async def export_blocks(self, block_ids: list[int]) -> Tensor:
        """The blocks' contents in host memory (they leave this device for an offload tier or a router)."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return await self._step(lambda: self._pool().export_blocks(ids).cpu())

    async def import_blocks(self, block_ids: list[int], data: Tensor) -> None:
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        await self._step(self._pool().import_blocks, ids, data.to(self.device))

    async def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        sources, targets = (torch.tensor(column, dtype=torch.long, device=self.device) for column in zip(*pairs))
        await self._step(self._pool().copy_blocks, sources, targets)

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

    # ---- training: optimizer steps driven by jobs/trainer.py (dense params; experts step on actors) ---
    async def rendezvous_address(self) -> str:
        """Where the data-parallel group meets, on this router's node (asked of rank 0)."""
        return rendezvous_address(ray.util.get_node_ip_address())

    async def init_data_parallel(self, rank: int, world_size: int, address: str, backend: str) -> None:
        """Join the routers' process group (every rank is called at once; this returns when all are in)."""
        def run() -> None:
            self.data_parallel = DataParallelGroup(rank, world_size, address, self.device, backend)
            if self.dense_optimizer is not None:
                self._average_over_ranks()

        await self._step(run)

    async def configure_training(self, optimizer: AdamWSettings, dtype: str = "float32") -> None:
        """AdamW over the dense parameters held here, and the autocast dtype of training forwards."""

        def run() -> None:
            self.dense_optimizer = NamedAdamW(dense_parameters(self.model), optimizer)
            self._average_over_ranks()
            self.train_dtype = dtype

        await self._step(run)

    def _average_over_ranks(self) -> None:
        """The dense gradients' averaging over this rank's group (made again if the group comes later)."""
        self.averager = GradientAverager(self.data_parallel, list(self.dense_optimizer.params.values()))

    async def train_step(
        self, input_ids: Tensor, labels: Tensor, ce_weight: float, seed: int, update: OptimizerUpdate
    ) -> StepParts:
        """One optimizer step of next-token training: this rank's forward + backward of its rows, then
        the update. Returns the loss parts and load, with the global gradient norm."""

        def run() -> StepParts:
            input_ids_, labels_ = input_ids.to(self.device), labels.to(self.device)
            self.experts.time_spent.take()  # from here on: this step's traffic only
            with self.averager.overlapping():
                parts = next_token_backward(self.model, input_ids_, labels_, ce_weight, seed, self.train_dtype)
            update_started = time.perf_counter()
            grad_norm = self._update(update)
            seconds = {**parts.seconds, **self.experts.time_spent.take(), "update": time.perf_counter() - update_started}
            return parts.model_copy(update={"grad_norm": grad_norm, "seconds": seconds})

        return await self._step(run)

    def _update(self, update: OptimizerUpdate) -> float:
        """The optimizer step that follows every rank's backward, whatever the loss: wait for the dense
        gradients' average over the ranks (started during backward; its last all-reduce is also the
        barrier after which every rank's expert backward is done), take the global norm (dense + every
        expert actor's: their gradients are the sum over ranks, hence / ranks²), then step the dense
        AdamW here and this rank's share of the expert actors with the same clip scale (theirs / ranks:
        the mean over ranks). Returns the norm."""
        dense, group = self.dense_optimizer, self.data_parallel
        self.averager.wait()
        experts = group.share(self.expert_actors)
        expert_norms = [actor.grad_sq_norm.remote() for actor in experts]
        dense_sq = dense.grad_sq_norm()
        expert_sq = group.sum(sum(self.objectstore.wait(expert_norms))) / group.world_size**2
        grad_norm = math.sqrt(dense_sq + expert_sq)
        scale = clip_scale(grad_norm, update.grad_clip)
        expert_steps = [actor.step.remote(update.lr, scale / group.world_size) for actor in experts]
        dense.step(update.lr, scale)  # while the expert actors step theirs
        self.objectstore.wait(expert_steps)
        return grad_norm

    async def save_dense(self, path: str) -> dict[str, int]:
        """Write the dense weights (HF names) as one safetensors file; returns name -> bytes."""
        return await self._step(lambda: write_shard(dense_state_dict(self.model), path))

    async def save_dense_optimizer(self, path: str) -> None:
        await self._step(self.dense_optimizer.save, path)

    async def load_dense_optimizer(self, paths: list[str]) -> int:
        return await self._step(self.dense_optimizer.load, paths)

    async def rng_state(self) -> Tensor:
        return await self._step(torch.get_rng_state)

    async def set_rng_state(self, state: Tensor) -> None:
        await self._step(torch.set_rng_state, state)

    # ---- GRPO: the policy update and the reference (π_ref), on these same weights (jobs/policy.py) -----
    async def policy_step(
        self, batch: PolicyBatch, settings: GRPOSettings, output_weight: float, seed: int, update: OptimizerUpdate
    ) -> PolicyParts:
        """One optimizer step of GRPO: this rank's forward (replaying the rollout's routing when the
        settings say so) + backward of its outputs, then the update SFT's steps take. Returns the
        objective's parts, with the global gradient norm."""

        def run() -> PolicyParts:
            with self.averager.overlapping():
                parts = policy_backward(
                    self.model, batch.to(self.device), settings, output_weight, seed, self.train_dtype
                )
            return parts.model_copy(update={"grad_norm": self._update(update)})

        return await self._step(run)

    async def logprobs(self, input_ids: Tensor, targets: Tensor) -> Tensor:
        """log π of each target with the weights in place (the reference's after use_reference(True))."""

        def run() -> Tensor:
            ids, tgt = input_ids.to(self.device), targets.to(self.device)
            return policy_logprobs(self.model, ids, tgt, self.train_dtype).cpu()

        return await self._step(run)

    async def configure_reference(self) -> None:
        """Freeze a copy of the dense weights as the reference."""

        def run() -> None:
            self.reference = ReferenceWeights(dense_parameters(self.model))

        await self._step(run)

    async def use_reference(self, reference: bool) -> None:
        await self._step(self.reference.use, reference)

    async def reset_reference(self) -> None:
        await self._step(self.reference.reset)

    async def save_reference(self, path: str) -> dict[str, int]:
        return await self._step(self.reference.save, path)

    async def load_reference(self, directory: str) -> None:
        await self._step(self.reference.load, directory)

    # ---- transports and placement -----------------------------------------------------------------
    async def set_transport(self, name: str) -> str:
        await self._step(self._use_transport, name)
        return self.transport_name

    def _use_transport(self, name: str) -> None:
        if name not in TRANSPORTS:
            raise ValueError(f"unknown transport {name!r}; one of {sorted(TRANSPORTS)}")
        current = self.experts.transport
        if current.name == name:
            return
        transport: ExpertTransport = self.objectstore
        if name != self.objectstore.name:
            transport = TRANSPORTS[name](
                self.expert_actors, self.settings.transport_settings, self.device, fallback=self.objectstore
            )
        if current is not self.objectstore:
            current.teardown()  # an idle compiled graph busy-polls its channels: keep none that is unused
        self.experts.transport = transport

    async def rebalance(self, extra_copies: int | None = None) -> dict:
        """Recompute the placement from the load measured so far and apply it between two steps."""
        extra = self.settings.extra_copies if extra_copies is None else extra_copies
        new = self.experts.placement.rebalance(self.stats.expert_load(), extra)
        await self._step(self._apply_placement, new)
        return new.model_dump()

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
