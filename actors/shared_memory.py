"""Large expert messages between a router and an expert actor of one node, through shared memory.

Ray carries a call's arguments and its answer inline (up to RAY_max_direct_call_object_size) by
copying them several times on each side: on a 2-core machine a round trip to 2 actors with 655 KB each
way took 4.3 ms inline and 2.1 ms with the arrays left in shared memory. So the router keeps one file
in /dev/shm per expert actor of its node: it writes a message into the file's first half and sends
only a `SharedTensor` naming it; the actor answers into the second half the same way. Messages to one
actor go one at a time (a layer's answer is read before the next message to that actor is written),
so one file per (router, actor) suffices.

The actor unlinks a file as soon as it has mapped it (both ends keep their mappings), so no file
outlives the processes that use it, however they end. An actor that cannot map a file (it runs on
another node, or it was restarted after the unlink) raises `SharedMemoryUnavailable`, and the router
sends that message inline and the next one through a new file.
"""

from __future__ import annotations

import logging
import math
import mmap
import os
import uuid
from typing import Callable, NamedTuple

import ray
import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
MIN_BYTES = 16 * 1024  # smaller messages cost about as much inline
MAX_BYTES = 256 * 1024**2  # larger ones travel inline rather than take that much of /dev/shm


class SharedTensor(NamedTuple):
    """A tensor left in a shared-memory file of the sender's node: what travels instead of its data."""

    path: str
    sender: str  # the router's Ray actor id (a restarted router keeps it)
    node_id: str  # the node whose /dev/shm holds the file
    offset: int  # bytes into the file
    shape: tuple[int, ...]
    dtype: str  # torch dtype name


class SharedMemoryUnavailable(RuntimeError):
    """The receiver could not map the file named by a message (a restarted actor, after the unlink)."""


class SharedMemoryOnAnotherNode(SharedMemoryUnavailable):
    """The file is in another node's /dev/shm: messages to this actor travel inline from now on."""


def _map(path: str, size: int | None = None) -> mmap.mmap:
    """Map an existing file, or create one of `size` bytes (space reserved now: a full /dev/shm is an
    OSError here rather than a SIGBUS at the first write)."""
    fd = os.open(path, os.O_RDWR | (os.O_CREAT | os.O_EXCL if size is not None else 0), 0o600)
    try:
        if size is not None:
            os.posix_fallocate(fd, 0, size)
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _view(buffer: mmap.mmap, offset: int, shape: tuple[int, ...], dtype: str) -> Tensor:
    return torch.frombuffer(buffer, dtype=getattr(torch, dtype), count=math.prod(shape), offset=offset).view(shape)


def _dtype_name(tensor: Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


class SharedLink:
    """The router's end of one expert actor's file: [messages | answers], each half `capacity` bytes."""

    def __init__(self, node_id: str, sender: str, actor: int):
        self.node_id, self.sender, self.actor = node_id, sender, actor
        self.prefix = os.path.join(SHM_DIR, f"moeray-{uuid.uuid4().hex[:12]}-{actor}")
        self.generation = 0
        self.path: str | None = None
        self.buffer: mmap.mmap | None = None
        self.capacity = 0
        self.busy = False  # a message is out and its answer not yet read
        self.answered: Callable[[], bool] | None = None  # whether the message's call is done (`carried_by`)
        self.enabled = os.path.isdir(SHM_DIR)

    def send(self, tensor: Tensor) -> SharedTensor | None:
        """Write `tensor` into the file; None when it should travel inline instead."""
        size = tensor.numel() * tensor.element_size()
        if self.busy and self.answered is not None and self.answered():
            self.busy = False  # its answer was never read (the step failed in between), but it is done
        if not self.enabled or self.busy or not MIN_BYTES <= size <= MAX_BYTES:
            return None
        if size > self.capacity and not self._grow(size):
            return None
        tensor = tensor.detach().to("cpu").contiguous()
        _view(self.buffer, 0, tuple(tensor.shape), _dtype_name(tensor)).copy_(tensor)
        self.busy, self.answered = True, None
        return SharedTensor(self.path, self.sender, self.node_id, 0, tuple(tensor.shape), _dtype_name(tensor))

    def carried_by(self, answered: Callable[[], bool]) -> None:
        """Whether the call that took the last message is done: then the file is free again, even if
        its answer is never read."""
        self.answered = answered

    def answer(self, reply: SharedTensor) -> Tensor:
        """The actor's answer, a view into the file: read it before the next message to this actor."""
        self.busy = False
        return _view(self.buffer, reply.offset, reply.shape, reply.dtype)

    def failed(self, error: BaseException | None = None) -> None:
        """A message did not come back through the file: the next one gets a new file, or, when the
        actor is on another node, none at all."""
        self.busy = False
        self._unlink()
        self.buffer, self.capacity = None, 0
        if isinstance(error, SharedMemoryOnAnotherNode):
            self.enabled = False

    def _grow(self, size: int) -> bool:
        self._unlink()
        capacity = max(size, 2 * self.capacity)
        capacity = -(-capacity // mmap.PAGESIZE) * mmap.PAGESIZE
        self.generation += 1
        path = f"{self.prefix}-{self.generation}"
        try:
            self.buffer = _map(path, 2 * capacity)
        except OSError as error:
            logger.warning("expert actor %d: no shared memory for its messages (%s); they travel inline", self.actor, error)
            _unlink(path)
            self.buffer, self.capacity, self.enabled = None, 0, False
            return False
        self.path, self.capacity = path, capacity
        return True

    def _unlink(self) -> None:
        """Remove the file's name if the actor has not mapped (and unlinked) it yet."""
        if self.path is not None:
            _unlink(self.path)


class SharedFiles:
    """The actor's end: the routers' files, mapped on first use: one per router, its newest (a
    restarted router's new files replace its predecessor's)."""

    def __init__(self, node_id: str | None = None):
        self.node_id = node_id  # this process's node; by default looked up at the first message
        self.mapped: dict[str, tuple[str, mmap.mmap]] = {}  # sender -> (path, mapping) of its newest file

    def tensor(self, message: SharedTensor, device: torch.device | str = "cpu") -> Tensor:
        """A copy of the message's tensor on `device` (the file is rewritten by the next message)."""
        view = _view(self._buffer(message), message.offset, message.shape, message.dtype)
        return view.to(device, copy=True)

    def answer(self, request: SharedTensor, tensor: Tensor) -> SharedTensor | None:
        """Write the answer to `request` into its file's second half; None when it does not fit."""
        tensor = tensor.detach().to("cpu").contiguous()
        buffer = self._buffer(request)
        half = len(buffer) // 2
        if tensor.numel() * tensor.element_size() > half:
            return None
        _view(buffer, half, tuple(tensor.shape), _dtype_name(tensor)).copy_(tensor)
        return request._replace(offset=half, shape=tuple(tensor.shape), dtype=_dtype_name(tensor))

    def _buffer(self, message: SharedTensor) -> mmap.mmap:
        path, node_id = message.path, message.node_id
        current = self.mapped.get(message.sender)
        if current is not None and current[0] == path:
            return current[1]
        if self.node_id is None:
            self.node_id = ray.get_runtime_context().get_node_id()
        if node_id != self.node_id:
            raise SharedMemoryOnAnotherNode(f"{path} is on another node ({node_id})")
        try:
            buffer = _map(path)
        except FileNotFoundError:
            raise SharedMemoryUnavailable(f"{path} is gone: mapped and unlinked by an earlier process") from None
        _unlink(path)
        self.mapped[message.sender] = (path, buffer)
        return buffer
