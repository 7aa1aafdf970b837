"""Ordinary actor calls, one per actor per layer, awaited together on the router's event loop.

It keeps Ray's restart and retry semantics and carries the backward pass.
"""

from __future__ import annotations

import asyncio

import ray
from torch import Tensor

from .base import ExpertReply, ExpertTransport, InFlight, Messages


class _Calls(InFlight):
    def __init__(self, transport: "ObjectStoreTransport", refs: dict[int, ray.ObjectRef]):
        self.transport, self.refs = transport, refs

    def receive(self) -> dict[int, ExpertReply]:
        actors = list(self.refs)
        replies = self.transport.wait([self.refs[a] for a in actors])
        return {a: ExpertReply(*r) if isinstance(r, tuple) else ExpertReply(r, None) for a, r in zip(actors, replies)}


class ObjectStoreTransport(ExpertTransport):
    name = "objectstore"

    def wait(self, refs: list[ray.ObjectRef]) -> list:
        """Await the calls together on the router's event loop (steps run on a worker thread)."""
        if self.loop is None:
            return ray.get(refs)

        async def gather() -> list:
            return list(await asyncio.gather(*refs))

        return asyncio.run_coroutine_threadsafe(gather(), self.loop).result()

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> InFlight:
        method = "forward_train" if keep_for_backward else "forward"
        return _Calls(
            self,
            {
                actor: getattr(self.actors[actor], method).remote(layer, tokens, counts)
                for actor, (tokens, counts) in messages.items()
            },
        )

    def backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> dict[int, Tensor]:
        actors = list(handles)
        refs = [self.actors[a].backward.remote(handles[a], grads[a]) for a in actors]
        return dict(zip(actors, self.wait(refs)))
