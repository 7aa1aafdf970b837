"""Ordinary actor calls, one per actor per layer, in flight together.

It keeps Ray's restart and retry semantics and carries the backward pass.
"""

from __future__ import annotations

import ray
from torch import Tensor

from ..wire import from_wire, to_wire
from .base import ExpertReply, ExpertTransport, InFlight, Messages


class _Calls(InFlight):
    def __init__(self, transport: "ObjectStoreTransport", refs: dict[int, ray.ObjectRef]):
        self.transport, self.refs = transport, refs

    def receive(self) -> dict[int, ExpertReply]:
        actors = list(self.refs)
        replies = self.transport.wait([self.refs[a] for a in actors])
        device = self.transport.device
        return {a: ExpertReply(from_wire(outputs, device), handle) for a, (outputs, handle) in zip(actors, replies)}


class ObjectStoreTransport(ExpertTransport):
    name = "objectstore"

    def wait(self, refs: list[ray.ObjectRef]) -> list:
        """Block the router's step thread (never its event loop) until every reply is in."""
        return ray.get(refs)

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> InFlight:
        method = "forward_train" if keep_for_backward else "forward"
        return _Calls(
            self,
            {
                actor: getattr(self.actors[actor], method).remote(layer, to_wire(tokens), counts)
                for actor, (tokens, counts) in messages.items()
            },
        )

    def send_backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> InFlight:
        return _Calls(self, {a: self.actors[a].backward.remote(handle, to_wire(grads[a])) for a, handle in handles.items()})
