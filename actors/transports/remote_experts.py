"""The router side of expert parallelism: the model's expert backend over a transport.

It splits one layer's expert-sorted tokens into one message per actor (following the placement),
hands the messages to the transport, and puts the answers back in order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from model.moe import ExpertBackend, PendingExperts

from ..load_stats import LoadStats
from ..placement import DispatchPlan, Placement
from .base import ExpertTransport, InFlight


@dataclass
class TransferTime:
    """Seconds the router's step thread spent handing tokens to the transport and waiting for replies."""

    send: float = 0.0
    wait: float = 0.0

    def take(self) -> dict[str, float]:
        """The totals since the last take, as expert_send / expert_wait; starts counting afresh."""
        totals = {"expert_send": self.send, "expert_wait": self.wait}
        self.send = self.wait = 0.0
        return totals


class LentThreads:
    """The router's torch threads (its step thread's): all of them for its own work, one from a layer's
    send until its replies are in, so that on a node with few cores the router's intra-op threads leave
    the cores to the expert actors while they compute (without it, a second router thread on 2 cores
    slowed the actors as much as it sped up the router)."""

    def __init__(self, threads: int):
        self.threads = threads

    def lend(self) -> None:
        if self.threads > 1:
            torch.set_num_threads(1)

    def take_back(self) -> None:
        if self.threads > 1:
            torch.set_num_threads(self.threads)


class _RemotePending(PendingExperts):
    def __init__(self, experts: "RemoteExperts", plan: DispatchPlan, tokens: Tensor, in_flight: InFlight):
        self.experts, self.transport = experts, experts.transport  # the backward goes the forward's way
        self.plan, self.tokens, self.in_flight = plan, tokens, in_flight
        self.handles: dict[int, int] = {}

    def _gather(self, in_flight: InFlight) -> Tensor:
        """Every actor's reply put back in the order of the tokens (the plan covers every row)."""
        gathered = torch.empty_like(self.tokens)
        started = time.perf_counter()
        try:
            replies = in_flight.receive()
        finally:
            self.experts.threads.take_back()
        self.experts.time_spent.wait += time.perf_counter() - started
        for actor, reply in replies.items():
            self.plan.put(gathered, actor, reply.outputs)
            if reply.backward_handle is not None:
                self.handles[actor] = reply.backward_handle
        return gathered

    def result(self) -> Tensor:
        return self._gather(self.in_flight)

    def start_backward(self, grad_outputs: Tensor) -> None:
        started = time.perf_counter()
        self.experts.threads.lend()
        grads = {actor: self.plan.take(grad_outputs, actor) for actor in self.handles}
        self.in_flight = self.transport.send_backward(self.handles, grads)
        self.experts.time_spent.send += time.perf_counter() - started

    def grad_tokens(self) -> Tensor:
        return self._gather(self.in_flight)


class RemoteExperts(ExpertBackend):
    def __init__(self, transport: ExpertTransport, placement: Placement, stats: LoadStats, threads: int = 1):
        """threads: the router's torch threads, lent back while its expert actors work (LentThreads)."""
        self.transport, self.placement, self.stats = transport, placement, stats
        self.time_spent = TransferTime()
        self.threads = LentThreads(threads)

    def submit(
        self, layer: int, tokens: Tensor, counts: list[int], token_index: Tensor, keep_for_backward: bool
    ) -> PendingExperts:
        started = time.perf_counter()
        self.threads.lend()
        plan = self.placement.plan(layer, counts)
        self.stats.record(layer, counts, plan, token_index)
        messages = {actor: (plan.take(tokens, actor), plan.counts[actor]) for actor in plan.active_actors}
        in_flight = self.transport.send(layer, messages, keep_for_backward)
        self.time_spent.send += time.perf_counter() - started
        return _RemotePending(self, plan, tokens, in_flight)
