"""Messages to the expert actors of the router's node over Unix sockets, tensors through shared memory.

During a training step on a 2-core machine (timed inside the processes, a one-off measurement), an
ordinary actor call took 0.3-0.45 ms of the router's CPU, about 1 ms of the actor's besides its method,
and 2-3 ms from `.remote()` to the method's start; a Unix-socket round trip took 30-110 µs, and its
reader blocks in the kernel instead of spinning a core (the compiled graph's readers spin while it
stands). Each expert actor listens on an abstract-namespace socket (Linux; a file in the temp directory
elsewhere) that only a holder of its random key can use; its server threads run the very methods Ray
would call, one message at a time with the actor's Ray methods (`SocketServer.lock`). The tensors
travel through the same shared-memory files as the object store's (`actors/shared_memory.py`).

It carries the forward and the backward. Actors of other nodes, and any actor whose connection has
broken, go through the object store (its fallback); a broken connection is opened again, at most
every RETRY_INTERVAL_S, once the actor answers.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable, NamedTuple

import ray
import torch
from torch import Tensor

from ..wire import to_wire
from .base import RETRY_INTERVAL_S, ExpertReply, ExpertTransport, InFlight, Messages, TransportSettings
from .objectstore import ObjectStoreTransport

logger = logging.getLogger(__name__)



class SocketAddress(NamedTuple):
    node_id: str  # the node the socket is on: only a router of that node can reach it
    address: str | bytes
    authkey: bytes


class SocketServer:
    """The expert actor's end: a listener, and one thread per connected router running its messages."""

    def __init__(self, handle: Callable[[str, tuple, Any, tuple], Any], torch_threads: int):
        """`handle(method, before, wire, after)`: the actor's own data-path method by name."""
        self.handle, self.torch_threads = handle, torch_threads
        self.lock = threading.Lock()  # the actor's: its methods that touch the experts hold it (`handle`'s too)
        self.address: SocketAddress | None = None

    def open(self) -> SocketAddress:
        """Listen (once per process) and say where."""
        if self.address is None:
            authkey = os.urandom(32)
            name = f"moeray-experts-{uuid.uuid4().hex}"
            path = f"\0{name}" if sys.platform == "linux" else os.path.join(tempfile.mkdtemp(), name)
            listener = Listener(path, family="AF_UNIX", authkey=authkey)
            threading.Thread(target=self._accept, args=(listener,), daemon=True, name="expert-socket").start()
            self.address = SocketAddress(ray.get_runtime_context().get_node_id(), path, authkey)
        return self.address

    def _accept(self, listener: Listener) -> None:
        while True:
            try:
                connection = listener.accept()
            except (AuthenticationError, EOFError, ConnectionError) as error:  # a wrong key, or gone during the challenge
                logger.warning("expert socket: a connection was refused (%s)", error)
                continue
            except OSError as error:  # the listener itself failed: routers reach this actor through the object store
                logger.error("expert socket: no longer listening (%s)", error)
                return
            threading.Thread(target=self._serve, args=(connection,), daemon=True, name="expert-socket-router").start()

    def _serve(self, connection: Connection) -> None:
        torch.set_num_threads(self.torch_threads)  # torch's thread count is per thread
        with connection:
            while True:
                try:
                    seq, method, before, wire, after = connection.recv()
                except (EOFError, OSError):  # the router closed it, or ended
                    return
                try:
                    reply = (seq, self.handle(method, before, wire, after), None)
                except Exception as error:
                    reply = (seq, None, _sendable(error))
                try:
                    connection.send(reply)
                except OSError:  # the router ended while this message ran
                    return


def _sendable(error: Exception) -> Exception:
    """The error itself when it pickles (the router raises it as the actor did), else its text."""
    try:
        ForkingPickler.dumps(error)
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


class _Connection:
    """The router's end of one actor's socket: requests numbered, so that a reply left unread by a
    failed step is recognised and dropped."""

    def __init__(self, address: SocketAddress):
        self.connection = Client(address.address, family="AF_UNIX", authkey=address.authkey)
        self.sent = 0  # the last request's number
        self.replied = 0  # the last reply's number

    def request(self, method: str, around: tuple[tuple, tuple], wire: Any) -> int:
        self.sent += 1
        before, after = around
        self.connection.send((self.sent, method, before, wire, after))
        return self.sent

    def done(self, seq: int) -> bool:
        """Whether request `seq` has been answered (the answer may have been dropped unread)."""
        while self.replied < seq and self.connection.poll(0):
            self.replied = self.connection.recv()[0]
        return self.replied >= seq

    def reply(self, seq: int) -> Any:
        """Request `seq`'s result (older replies, left unread by a failed step, are dropped); as a Ray
        call would, it waits as long as the actor lives."""
        while True:
            replied, result, error = self.connection.recv()
            self.replied = replied
            if replied == seq:
                if error is not None:
                    raise error
                return result

    def close(self) -> None:
        self.connection.close()


class _Requests(InFlight):
    def __init__(self, transport: "SocketTransport", requests: dict[int, tuple], inline: InFlight | None):
        """requests: actor -> (number, method, around, tensor), kept to send it again if the socket broke."""
        self.transport, self.requests, self.inline = transport, requests, inline

    def receive(self) -> dict[int, ExpertReply]:
        replies = self.inline.receive() if self.inline is not None else {}
        transport = self.transport
        for actor, (seq, method, around, tensor) in self.requests.items():
            try:
                outputs, handle = transport.connections[actor].reply(seq)
            except (EOFError, OSError) as error:  # the actor's process ended: its replacement, if any, by Ray
                transport.lost(actor, error)
                replies[actor] = transport.fallback.send_calls({actor: (method, around, tensor)}).receive()[actor]
                continue
            replies[actor] = ExpertReply(transport.fallback.read(actor, outputs), handle)
        return replies


class SocketTransport(ExpertTransport):
    name = "socket"

    def __init__(
        self, actors: list, settings: TransportSettings, device: torch.device, fallback: ExpertTransport | None = None
    ):
        if not isinstance(fallback, ObjectStoreTransport):
            raise ValueError("the socket transport needs the object store as its fallback")
        super().__init__(actors, settings, device, fallback)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.connections: dict[int, _Connection] = {}  # the actors of this node
        self.broken: set[int] = set()  # actors whose connection broke, not opened again yet
        self._failures = 0
        self._next_retry = 0.0
        self._connect(list(range(len(actors))))

    def _connect(self, actors: list[int]) -> None:
        addresses = ray.get([self.actors[a].open_socket.remote() for a in actors], timeout=self.settings.timeout_s)
        for actor, address in zip(actors, addresses):
            if address.node_id == self.node_id:
                try:
                    self.connections[actor] = _Connection(address)
                except OSError as error:  # its listener failed: tried again later, the object store meanwhile
                    logger.warning("expert actor %d: its socket refused the router (%s)", actor, error)
                    self.broken.add(actor)
                    continue
            self.broken.discard(actor)

    def lost(self, actor: int, error: BaseException) -> None:
        logger.warning("expert actor %d: its socket broke (%s); its messages go through the object store", actor, error)
        self.connections.pop(actor).close()
        self.fallback.link(actor).failed()
        self.broken.add(actor)
        self._failures += 1
        self._next_retry = time.monotonic() + RETRY_INTERVAL_S

    def _reconnect(self) -> None:
        """Open the sockets of restarted actors (their new processes listen afresh)."""
        if not self.broken or time.monotonic() < self._next_retry:
            return
        self._next_retry = time.monotonic() + RETRY_INTERVAL_S
        try:
            self._connect(sorted(self.broken))
        except Exception as error:  # still restarting: the object store carries their messages meanwhile
            logger.info("expert actors %s: no socket yet (%s)", sorted(self.broken), error)

    @property
    def healthy(self) -> bool:
        """Every actor of this node is reached through its socket."""
        return not self.broken

    @property
    def failures(self) -> int:
        return self._failures

    def _send(self, calls: dict[int, tuple[str, tuple[tuple, tuple], Tensor]]) -> InFlight:
        self._reconnect()
        requests, inline = {}, {}
        for actor, (method, around, tensor) in calls.items():
            connection = self.connections.get(actor)
            if connection is None:
                inline[actor] = (method, around, tensor)
                continue
            link = self.fallback.link(actor)
            shared = link.send(tensor)
            try:
                seq = connection.request(method, around, to_wire(tensor) if shared is None else shared)
            except OSError as error:
                self.lost(actor, error)
                inline[actor] = (method, around, tensor)
                continue
            if shared is not None:
                link.carried_by(lambda connection=connection, seq=seq: connection.done(seq))
            self.fallback.sent["socket_inline" if shared is None else "socket_shared_memory"] += 1
            requests[actor] = (seq, method, around, tensor)
        return _Requests(self, requests, self.fallback.send_calls(inline) if inline else None)

    def send(self, layer: int, messages: Messages, keep_for_backward: bool) -> InFlight:
        return self._send(ObjectStoreTransport.forward_calls(layer, messages, keep_for_backward))

    def send_backward(self, handles: dict[int, int], grads: dict[int, Tensor]) -> InFlight:
        return self._send(ObjectStoreTransport.backward_calls(handles, grads))

    def teardown(self) -> None:
        for connection in self.connections.values():
            connection.close()
        self.connections.clear()
