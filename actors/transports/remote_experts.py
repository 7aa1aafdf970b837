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


class _RemotePending(PendingExperts):
    def __init__(
        self, transport: ExpertTransport, plan: DispatchPlan, tokens: Tensor, in_flight: InFlight, time_spent: TransferTime
    ):
        self.transport, self.plan, self.tokens, self.in_flight = transport, plan, tokens, in_flight
        self.time_spent = time_spent
        self.handles: dict[int, int] = {}

    def _gather(self, in_flight: InFlight) -> Tensor:
        """Every actor's reply put back in the order of the tokens (the plan covers every row)."""
        gathered = torch.empty_like(self.tokens)
        started = time.perf_counter()
        replies = in_flight.receive()
        self.time_spent.wait += time.perf_counter() - started
        for actor, reply in replies.items():
            self.plan.put(gathered, actor, reply.outputs)
            if reply.backward_handle is not None:
                self.handles[actor] = reply.backward_handle
        return gathered

    def result(self) -> Tensor:
        return self._gather(self.in_flight)

    def start_backward(self, grad_outputs: Tensor) -> None:
        started = time.perf_counter()
        grads = {actor: self.plan.take(grad_outputs, actor) for actor in self.handles}
        self.in_flight = self.transport.send_backward(self.handles, grads)
        self.time_spent.send += time.perf_counter() - started

    def grad_tokens(self) -> Tensor:
        return self._gather(self.in_flight)


class RemoteExperts(ExpertBackend):
    def __init__(self, transport: ExpertTransport, placement: Placement, stats: LoadStats):
        self.transport, self.placement, self.stats = transport, placement, stats
        self.time_spent = TransferTime()

    def submit(
        self, layer: int, tokens: Tensor, counts: list[int], token_index: Tensor, keep_for_backward: bool
    ) -> PendingExperts:
        started = time.perf_counter()
        plan = self.placement.plan(layer, counts)
        self.stats.record(layer, counts, plan, token_index)
        messages = {actor: (plan.take(tokens, actor), plan.counts[actor]) for actor in plan.active_actors}
        in_flight = self.transport.send(layer, messages, keep_for_backward)
        self.time_spent.send += time.perf_counter() - started
        return _RemotePending(self.transport, plan, tokens, in_flight, self.time_spent)
