"""A Ray Compiled Graph over all expert actors: numpy through shared memory on a host, NCCL between
distinct GPUs.

Inference only; it must be built and executed by the one thread that owns it (the router's step
thread). It dies with any of its actors, so it falls back to the object store and recompiles once
every actor answers again. Its actors' channel readers spin while it stands, so once it has been idle
for `idle_release_s` it is torn down, and the next layer compiles it again.
"""

from __future__ import annotations

import logging
import time

import ray
import torch

from ..devices import on_distinct_gpus, where_this_computes
from ..wire import from_wire, to_wire
from .base import RETRY_INTERVAL_S, ExpertReply, ExpertTransport, InFlight, Messages, TransportSettings

logger = logging.getLogger(__name__)



def tear_down_quietly(graph) -> None:
    """Ray logs each step of a compiled graph's teardown at INFO in this (the router's) process, and
    the lines reach the driver's output at every transport switch and graph teardown: not for users."""
    dag_logger = logging.getLogger("ray.dag.compiled_dag_node")
    level = dag_logger.level
    dag_logger.setLevel(logging.WARNING)
    try:
        graph.teardown()
    finally:
        dag_logger.setLevel(level)


class _Execution(InFlight):
    def __init__(self, transport: "CompiledGraphTransport", layer: int, messages: Messages, refs: list):
        self.transport, self.layer, self.messages, self.refs = transport, layer, messages, refs

    def receive(self) -> dict[int, ExpertReply]:
        try:
            outputs = ray.get(self.refs)
        except Exception as error:
            self.transport.broken(error)
            return self.transport.fallback.send(self.layer, self.messages, False).receive()
        if self.transport.nccl:
            return {a: ExpertReply(outputs[a], None) for a in self.messages}
        return {a: ExpertReply(from_wire(outputs[a], self.transport.device), None) for a in self.messages}


class CompiledGraphTransport(ExpertTransport):
    name = "compiled"

    def __init__(
        self, actors: list, settings: TransportSettings, device: torch.device, fallback: ExpertTransport | None = None
    ):
        if fallback is None:
            raise ValueError("the compiled transport needs the object store as its fallback")
        super().__init__(actors, settings, device, fallback)
        self.graph = None
        self.nccl = self._nccl_between_actors()
        self._failures = 0
        self._next_retry = 0.0
        self._released = False
        self._last_used = time.monotonic()
        self._compile()

    def _compile(self) -> None:
        from ray.dag import InputNode, MultiOutputNode
        from ray.dag.context import DAGContext

        context = DAGContext.get_current()  # Ray's 10 s defaults are too tight for a busy 2-core node
        context.get_timeout = context.submit_timeout = self.settings.timeout_s

        with InputNode() as inputs:
            outputs = []
            for i, actor in enumerate(self.actors):
                reply = actor.forward_compiled.bind(inputs[i])
                outputs.append(reply.with_tensor_transport("auto") if self.nccl else reply)
            dag = MultiOutputNode(outputs)
        self.graph = dag.experimental_compile()

    def _nccl_between_actors(self) -> bool:
        """Tensors travel by NCCL between the router and actors on distinct GPUs. Anywhere else (on
        the CPU, or actors sharing a GPU: NCCL cannot join two ranks on one GPU) they travel as numpy
        arrays through host shared memory: Ray's own tensor channel costs more there (a round trip to
        1 actor at batch 1 took 0.55 ms with tensors, 0.17 ms with numpy on a 2-core machine)."""
        if self.device.type != "cuda":
            return False
        described = [where_this_computes(self.device), *ray.get([actor.ready.remote() for actor in self.actors])]
        if on_distinct_gpus(described):
            return True
        logger.info("compiled graph: actors share a GPU, so tensors travel through host shared memory")
        return False

    @property
    def healthy(self) -> bool:
        return self.graph is not None or self._released

    @property
    def released(self) -> bool:
        return self._released

    def release_if_idle(self) -> None:
        """Its actors' channel readers spin a core each for as long as the graph stands (Ray 2.60), idle or
        not: on a small node those are the cores the router needs. Compiling again costs ~0.2 s."""
        idle_release_s = self.settings.idle_release_s
        if self.graph is None or idle_release_s is None or time.monotonic() - self._last_used < idle_release_s:
            return
        try:
            self.teardown()
        except Exception as error:  # a graph that cannot be torn down is broken: recover as from a failure
            self.broken(error)
            return
        self._released = True
        self._next_retry = 0.0  # the next layer compiles it again at once
        logger.info("compiled graph released after %.0f s unused; the next step compiles it again", idle_release_s)

    @property
    def failures(self) -> int:
        return self._failures

    def _recover(self) -> None:
        """After a failure or a release: once every actor answers again, compile a fresh graph."""
        if self.graph is not None or time.monotonic() < self._next_retry:
            return
        self._next_retry = time.monotonic() + RETRY_INTERVAL_S
        try:
            ray.get([actor.ready.remote() for actor in self.actors], timeout=RETRY_INTERVAL_S)
            self._compile()
            logger.info("compiled graph rebuilt")
        except Exception as error:  # an actor still restarting: stay on the object store
            logger.info("compiled graph not rebuilt yet: %s", error)
        self._released = False  # rebuilt, or as good as broken until it is

    def broken(self, error: Exception) -> None:
        logger.warning("compiled graph failed (%s); falling back to the object store", error)
        self._failures += 1
        graph, self.graph = self.graph, None
        try:
            tear_down_quietly(graph)
        except Exception:  # the graph is already half gone with its actor; nothing more to release
            pass
        self._next_retry = time.monotonic() + RETRY_INTERVAL_S

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> InFlight:
        if keep_for_backward:
            return self.fallback.send(layer, messages, keep_for_backward)
        self._last_used = time.monotonic()
        self._recover()
        if self.graph is None:
            return self.fallback.send(layer, messages, keep_for_backward)
        # Every actor of the graph runs each time; idle ones get no tokens (zero-size tensors do not
        # survive a tensor channel).
        inputs = []
        for actor in range(len(self.actors)):
            tokens, counts = messages.get(actor, (None, []))
            inputs.append((layer, tokens if tokens is None or self.nccl else to_wire(tokens), counts))
        try:
            refs = self.graph.execute(*inputs)
        except Exception as error:
            self.broken(error)
            return self.fallback.send(layer, messages, keep_for_backward)
        return _Execution(self, layer, messages, refs)

    def teardown(self) -> None:
        if self.graph is not None:
            tear_down_quietly(self.graph)
            self.graph = None
