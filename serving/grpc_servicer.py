"""What Serve's gRPC proxy imports to register the moeray service (kept light: the proxy imports no
torch). The generated registration, with one change: a request that is not a valid protobuf message
of its method's type reaches the servicer as an `Undecodable` (answered INVALID_ARGUMENT) instead of
failing inside grpc with UNKNOWN."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import grpc
from google.protobuf.message import DecodeError

from .moeray_pb2_grpc import add_MoerayServicer_to_server


class Undecodable:
    """A request whose bytes did not parse (the error names the message type)."""

    def __init__(self, error: str):
        self.error = error


def _tolerant(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    parse: Callable[[bytes], object] = handler.request_deserializer

    def deserialize(data: bytes) -> object:
        try:
            return parse(data)
        except DecodeError as error:
            return Undecodable(str(error))

    return handler._replace(request_deserializer=deserialize)


class _TolerantRegistration:
    """Hands the generated handlers to the server with tolerant deserializers."""

    def __init__(self, server):
        self.server = server

    def add_generic_rpc_handlers(self, generic_handlers: Sequence) -> None:
        for generic in generic_handlers:
            generic._method_handlers = {name: _tolerant(h) for name, h in generic._method_handlers.items()}
        self.server.add_generic_rpc_handlers(generic_handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        self.server.add_registered_method_handlers(service, {name: _tolerant(h) for name, h in handlers.items()})


def add_moeray_servicer(servicer, server) -> None:
    """The `grpc_servicer_functions` entry of Serve's gRPC options."""
    add_MoerayServicer_to_server(servicer, _TolerantRegistration(server))
