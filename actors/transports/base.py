"""The transport interface: one layer's messages out to the expert actors, their replies back."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Annotated, ClassVar, NamedTuple

import torch
from pydantic import AfterValidator, BaseModel, Field
from torch import Tensor

Messages = dict[int, tuple[Tensor, list[int]]]  # actor -> (tokens, counts over all routed experts)
RETRY_INTERVAL_S = 2.0  # a transport that lost an actor tries to reach its new process at most this often


class ExpertReply(NamedTuple):
    outputs: Tensor  # a forward's outputs, or a backward's gradient of the tokens
    backward_handle: int | None  # set when the actor kept what its backward needs


class TransportSettings(BaseModel):
    timeout_s: float = Field(30.0, gt=0, description="a transport that can hang gives up (and falls back) after this")
    idle_release_s: float | None = Field(
        10.0, gt=0, description="a transport whose actors spin while it stands (the compiled graph) lets go after "
        "this long without a layer, and the next layer builds it again; None = never",
    )


class InFlight(ABC):
    """What `send` returns: one layer's messages on their way."""

    @abstractmethod
    def receive(self) -> dict[int, ExpertReply]:
        """Wait for every actor's reply: actor -> reply."""


TRANSPORTS: dict[str, type["ExpertTransport"]] = {}


def transport_names() -> list[str]:
    return sorted(TRANSPORTS)


def registered_transport(name: str) -> str:
    if name not in TRANSPORTS:
        raise ValueError(f"unknown transport {name!r}; one of {transport_names()}")
    return name


TransportName = Annotated[str, AfterValidator(registered_transport)]  # a config field naming a transport


class ExpertTransport(ABC):
    """Subclasses with a `name` register themselves. The object-store transport is the graph's base
    path (it carries the backward pass); any other transport is built over it as its `fallback`."""

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            if cls.name in TRANSPORTS:
                raise ValueError(f"transport {cls.name!r} is registered twice")
            TRANSPORTS[cls.name] = cls

    def __init__(
        self, actors: list, settings: TransportSettings, device: torch.device, fallback: "ExpertTransport | None" = None
    ):
        """`device`: the router's; replies are handed back on it."""
        self.actors, self.settings, self.device, self.fallback = actors, settings, device, fallback

    @abstractmethod
    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> InFlight:
        """Start the work of one MoE layer."""

    def send_backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> InFlight:
        """Start the backward of one layer: per actor, the gradient of the outputs out (with the handle
        its forward returned); the gradient of the tokens comes back as the reply's outputs."""
        if self.fallback is None:
            raise NotImplementedError(f"the {self.name} transport carries no backward pass")
        return self.fallback.send_backward(handles, grads)

    @property
    def healthy(self) -> bool:
        return True

    @property
    def failures(self) -> int:
        return 0

    @property
    def released(self) -> bool:
        """Let go for being idle (see `release_if_idle`); the next `send` takes it up again."""
        return False

    def release_if_idle(self) -> None:
        """Called by the thread that drives the transport, between two steps: let go of what costs while
        unused (the compiled graph's spinning channel readers) once it has been idle for idle_release_s."""

    def teardown(self) -> None:
        """Release what the transport holds (threads, channels); the actors stay."""
