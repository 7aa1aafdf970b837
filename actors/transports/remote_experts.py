"""The router side of expert parallelism: the model's expert backend over a transport.

It splits one layer's expert-sorted tokens into one message per actor (following the placement),
hands the messages to the transport, and puts the answers back in order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from model.moe import ExpertBackend, PendingExperts

from ..load_stats import LoadStats
from ..placement import DispatchPlan, Placement
from .base import ExpertTransport, InFlight


class _RemotePending(PendingExperts):
    def __init__(self, transport: ExpertTransport, plan: DispatchPlan, tokens: Tensor, in_flight: InFlight):
        self.transport, self.plan, self.tokens, self.in_flight = transport, plan, tokens, in_flight
        self.handles: dict[int, int] = {}

    def _gather(self, in_flight: InFlight) -> Tensor:
        """Every actor's reply put back in the order of the tokens (the plan covers every row)."""
        gathered = torch.empty_like(self.tokens)
        for actor, reply in in_flight.receive().items():
            self.plan.put(gathered, actor, reply.outputs)
            if reply.backward_handle is not None:
                self.handles[actor] = reply.backward_handle
        return gathered

    def result(self) -> Tensor:
        return self._gather(self.in_flight)

    def start_backward(self, grad_outputs: Tensor) -> None:
        grads = {actor: self.plan.take(grad_outputs, actor) for actor in self.handles}
        self.in_flight = self.transport.send_backward(self.handles, grads)

    def grad_tokens(self) -> Tensor:
        return self._gather(self.in_flight)


class RemoteExperts(ExpertBackend):
    def __init__(self, transport: ExpertTransport, placement: Placement, stats: LoadStats):
        self.transport, self.placement, self.stats = transport, placement, stats

    def submit(
        self, layer: int, tokens: Tensor, counts: list[int], token_index: Tensor, keep_for_backward: bool
    ) -> PendingExperts:
        plan = self.placement.plan(layer, counts)
        self.stats.record(layer, counts, plan, token_index)
        messages = {actor: (plan.take(tokens, actor), plan.counts[actor]) for actor in plan.active_actors}
        return _RemotePending(self.transport, plan, tokens, self.transport.send(layer, messages, keep_for_backward))
