"""How hidden states travel between a router and the expert actors.

`RemoteExperts` is the model's expert backend on a router: it splits one layer's expert-sorted tokens
into one message per actor (following the placement), hands the messages to a transport, and puts the
answers back in order. Two transports, same outputs:
- `ObjectStoreTransport`: ordinary actor calls, one per actor per layer, awaited together; keeps Ray's
  restart and retry semantics, and carries the backward pass.
- `CompiledGraphTransport`: a Ray Compiled Graph over all expert actors (shared memory on CPU, NCCL on
  GPUs); it dies with any of its actors, so it falls back to the object store and recompiles later.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from typing import Any

import ray
import torch
from torch import Tensor

from cluster.load_stats import LoadStats
from cluster.placement import DispatchPlan, Placement
from model.moe import ExpertBackend, PendingExperts

logger = logging.getLogger(__name__)

Messages = dict[int, tuple[Tensor, list[int]]]  # actor -> (tokens, counts over all routed experts)


class ExpertTransport(ABC):
    @abstractmethod
    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> Any:
        """Start the work; returns whatever `receive` needs."""

    @abstractmethod
    def receive(self, sent: Any) -> dict[int, tuple[Tensor, int | None]]:
        """actor -> (outputs, backward handle or None)."""

    def backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> dict[int, Tensor]:
        raise NotImplementedError(f"{type(self).__name__} carries no backward pass")


class ObjectStoreTransport(ExpertTransport):
    def __init__(self, actors: list):
        self.actors = actors
        self.loop: asyncio.AbstractEventLoop | None = None  # the async router's loop, when there is one

    def wait(self, refs: list[ray.ObjectRef]) -> list:
        """Await all calls together on the router's event loop (the step runs on a worker thread)."""
        if self.loop is None:
            return ray.get(refs)

        async def gather() -> list:
            return list(await asyncio.gather(*refs))

        return asyncio.run_coroutine_threadsafe(gather(), self.loop).result()

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> dict[int, ray.ObjectRef]:
        method = "forward_train" if keep_for_backward else "forward"
        return {
            actor: getattr(self.actors[actor], method).remote(layer, tokens, counts)
            for actor, (tokens, counts) in messages.items()
        }

    def receive(self, sent: dict[int, ray.ObjectRef]) -> dict[int, tuple[Tensor, int | None]]:
        actors = list(sent)
        results = self.wait([sent[a] for a in actors])
        return {a: r if isinstance(r, tuple) else (r, None) for a, r in zip(actors, results)}

    def backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> dict[int, Tensor]:
        actors = list(handles)
        refs = [self.actors[a].backward.remote(handles[a], grads[a]) for a in actors]
        return dict(zip(actors, self.wait(refs)))


class CompiledGraphTransport(ExpertTransport):
    """Inference only. Must be built and executed in the one process that owns it (the router)."""

    def __init__(
        self, actors: list, fallback: ObjectStoreTransport, timeout_s: float = 30.0, retry_interval_s: float = 2.0
    ):
        self.actors = actors
        self.fallback = fallback
        self.timeout_s = timeout_s
        self.retry_interval_s = retry_interval_s
        self.graph = None
        self.failures = 0
        self._next_retry = 0.0
        self._compile()

    def _compile(self) -> None:
        from ray.dag import InputNode, MultiOutputNode
        from ray.dag.context import DAGContext

        context = DAGContext.get_current()  # Ray's 10 s defaults are too tight for a busy 2-core node
        context.get_timeout = context.submit_timeout = self.timeout_s

        with InputNode() as inputs:
            outputs = [
                actor.forward_compiled.bind(inputs[i]).with_tensor_transport("auto")
                for i, actor in enumerate(self.actors)
            ]
            dag = MultiOutputNode(outputs)
        self.graph = dag.experimental_compile()

    @property
    def healthy(self) -> bool:
        return self.graph is not None

    def _recover(self) -> None:
        """After a failure: once every actor answers again, compile a fresh graph."""
        if self.graph is not None or time.monotonic() < self._next_retry:
            return
        self._next_retry = time.monotonic() + self.retry_interval_s
        try:
            ray.get([actor.ready.remote() for actor in self.actors], timeout=self.retry_interval_s)
            self._compile()
            logger.info("compiled graph rebuilt")
        except Exception as error:  # an actor still restarting: stay on the object store
            logger.info("compiled graph not rebuilt yet: %s", error)

    def _broken(self, error: Exception) -> None:
        logger.warning("compiled graph failed (%s); falling back to the object store", error)
        self.failures += 1
        graph, self.graph = self.graph, None
        try:
            graph.teardown()
        except Exception:
            pass
        self._next_retry = time.monotonic() + self.retry_interval_s

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> Any:
        self._recover()
        if keep_for_backward or self.graph is None:
            return ("fallback", self.fallback.send(layer, messages, keep_for_backward))
        # Every actor of the graph runs each time; idle ones get no tokens (zero-size tensors do not
        # survive the shared-memory channel).
        idle = (None, [])
        inputs = [(layer, *messages.get(a, idle)) for a in range(len(self.actors))]
        try:
            refs = self.graph.execute(*inputs)
        except Exception as error:
            self._broken(error)
            return ("fallback", self.fallback.send(layer, messages, keep_for_backward))
        return ("graph", (layer, messages, refs))

    def receive(self, sent: Any) -> dict[int, tuple[Tensor, int | None]]:
        kind, payload = sent
        if kind == "fallback":
            return self.fallback.receive(payload)
        layer, messages, refs = payload
        try:
            outputs = ray.get(refs)
        except Exception as error:
            self._broken(error)
            return self.fallback.receive(self.fallback.send(layer, messages, False))
        return {a: (outputs[a], None) for a in messages}

    def backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> dict[int, Tensor]:
        return self.fallback.backward(handles, grads)

    def teardown(self) -> None:
        if self.graph is not None:
            self.graph.teardown()
            self.graph = None


class _RemotePending(PendingExperts):
    def __init__(self, transport: ExpertTransport, plan: DispatchPlan, tokens: Tensor, sent: Any):
        self.transport, self.plan, self.tokens, self.sent = transport, plan, tokens, sent
        self.handles: dict[int, int] = {}

    def result(self) -> Tensor:
        outputs = torch.empty_like(self.tokens)
        for actor, (out, handle) in self.transport.receive(self.sent).items():
            outputs[self.plan.rows[actor]] = out
            if handle is not None:
                self.handles[actor] = handle
        return outputs

    def backward(self, grad_outputs: Tensor) -> Tensor:
        grads = {actor: grad_outputs[self.plan.rows[actor]].contiguous() for actor in self.handles}
        grad_tokens = torch.zeros_like(self.tokens)
        for actor, grad in self.transport.backward(self.handles, grads).items():
            grad_tokens[self.plan.rows[actor]] = grad
        return grad_tokens


class RemoteExperts(ExpertBackend):
    """The router side of expert parallelism: placement-aware split, one message per actor."""

    def __init__(self, transport: ExpertTransport, placement: Placement, stats: LoadStats):
        self.transport, self.placement, self.stats = transport, placement, stats

    def submit(
        self, layer: int, tokens: Tensor, counts: list[int], token_index: Tensor, keep_for_backward: bool
    ) -> PendingExperts:
        plan = self.placement.plan(layer, counts)
        self.stats.record(layer, counts, plan, token_index)
        messages = {
            actor: (tokens[plan.rows[actor]].contiguous(), plan.counts[actor]) for actor in plan.active_actors
        }
        return _RemotePending(self.transport, plan, tokens, self.transport.send(layer, messages, keep_for_backward))
