"""Ordinary actor calls, one per actor per layer, in flight together.

It keeps Ray's restart and retry semantics and carries the backward pass. A large message to an actor
of the router's node travels through shared memory (`actors/shared_memory.py`), the call carrying only
its name; any other travels inline as numpy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import ray
from torch import Tensor

from ..shared_memory import SharedLink, SharedMemoryUnavailable, SharedTensor
from ..wire import Wire, from_wire, to_wire
from .base import ExpertReply, ExpertTransport, InFlight, Messages


# A message's tensor goes inline or through shared memory, carried by a Ray call or by a Unix socket
# (the socket transport counts its messages in its fallback's `sent`, under socket_*).
MESSAGE_ROUTES = ("shared_memory", "inline", "socket_shared_memory", "socket_inline")
Calls = dict[int, tuple[str, tuple[tuple, tuple], Tensor]]  # actor -> (method, arguments around the tensor, tensor)


@dataclass
class _Call:
    method: str
    around: tuple[tuple, tuple]  # the call's arguments before and after the tensor
    tensor: Tensor
    shared: bool  # the tensor went through the actor's shared-memory file
    ref: ray.ObjectRef


class _Calls(InFlight):
    def __init__(self, transport: "ObjectStoreTransport", calls: dict[int, _Call]):
        self.transport, self.calls = transport, calls

    def receive(self) -> dict[int, ExpertReply]:
        actors = list(self.calls)
        try:
            try:
                replies = self.transport.wait([self.calls[a].ref for a in actors])
            except SharedMemoryUnavailable:
                replies = [self._inline_after_shared(a) for a in actors]
        except Exception:
            for actor, call in self.calls.items():
                if call.shared:
                    self.transport.link(actor).failed()
            raise
        return {a: ExpertReply(self.transport.read(a, outputs), handle) for a, (outputs, handle) in zip(actors, replies)}

    def _inline_after_shared(self, actor: int) -> tuple:
        """This actor's reply; if it could not map the file, the same call again, inline."""
        call = self.calls[actor]
        try:
            return self.transport.wait([call.ref])[0]
        except SharedMemoryUnavailable as error:
            self.transport.link(actor).failed(error)
            call.shared = False
            self.transport.sent["inline"] += 1
            call.ref = self.transport.call(actor, call.method, call.around, to_wire(call.tensor))
            return self.transport.wait([call.ref])[0]


class ObjectStoreTransport(ExpertTransport):
    name = "objectstore"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._links: list[SharedLink] | None = None
        self.sent: Counter[str] = Counter()  # messages by the way they went (MESSAGE_ROUTES)

    def wait(self, refs: list[ray.ObjectRef]) -> list:
        """Block the router's step thread (never its event loop) until every reply is in."""
        return ray.get(refs)

    def link(self, actor: int) -> SharedLink:
        """The shared-memory file for this actor's messages (made when first needed)."""
        if self._links is None:
            context = ray.get_runtime_context()
            sender = context.get_actor_id() or context.get_worker_id()
            self._links = [SharedLink(context.get_node_id(), sender, a) for a in range(len(self.actors))]
        return self._links[actor]

    def call(self, actor: int, method: str, around: tuple[tuple, tuple], message: Wire) -> ray.ObjectRef:
        before, after = around
        return getattr(self.actors[actor], method).remote(*before, message, *after)

    def read(self, actor: int, message: Wire) -> Tensor:
        """A reply's tensor on the router's device (from shared memory: valid until the next message)."""
        if isinstance(message, SharedTensor):
            return self.link(actor).answer(message).to(self.device)
        return from_wire(message, self.device)

    def send_calls(self, calls: Calls) -> InFlight:
        """Call each actor's data-path method with its tensor (through shared memory when it can)."""
        started = {}
        for actor, (method, around, tensor) in calls.items():
            link = self.link(actor)
            shared = link.send(tensor)
            ref = self.call(actor, method, around, to_wire(tensor) if shared is None else shared)
            if shared is not None:
                link.carried_by(lambda ref=ref: bool(ray.wait([ref], timeout=0)[0]))
            self.sent["inline" if shared is None else "shared_memory"] += 1
            started[actor] = _Call(method, around, tensor, shared is not None, ref)
        return _Calls(self, started)

    @staticmethod
    def forward_calls(layer: int, messages: Messages, keep_for_backward: bool) -> Calls:
        method = "forward_train" if keep_for_backward else "forward"
        return {actor: (method, ((layer,), (counts,)), tokens) for actor, (tokens, counts) in messages.items()}

    @staticmethod
    def backward_calls(handles: dict[int, int], grads: dict[int, Tensor]) -> Calls:
        return {actor: ("backward", ((handle,), ()), grads[actor]) for actor, handle in handles.items()}

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> InFlight:
        return self.send_calls(self.forward_calls(layer, messages, keep_for_backward))

    def send_backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> InFlight:
        return self.send_calls(self.backward_calls(handles, grads))
