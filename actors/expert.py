"""ExpertActor: one device and a slice of the routed experts of every MoE layer.

It wraps `model.moe.LocalExperts`, the same code the one-process model runs, and adds what only an
owner of parameters needs: their gradients, their AdamW state, and shipping experts to other actors
when the placement changes.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import ray
import torch
from torch import Tensor

from model import DeepseekV2Config, LocalExperts
from model.checkpoint import write_shard
from model.moe import make_experts
from model.training import AdamWSettings, NamedAdamW, ReferenceWeights, autocast, grad_sq_norm, gradients, zero_grads

from .cpu_affinity import PinnedCores
from .devices import ComputeDtype, actor_device, compute_dtype, where_this_computes
from .shared_memory import SharedFiles, SharedTensor
from .transports.unix_socket import SocketAddress, SocketServer
from .wire import Wire, WireTensor, from_wire, to_wire


IDLE_REPLY = torch.zeros(1)
DATA_PATH = ("forward", "forward_train", "backward")  # what a socket message may call
UNLOCKED = ("ready", "held", "pin_to_cores", "open_socket")  # they touch no expert


def _one_at_a_time(cls: type) -> type:
    """Ray runs an actor's calls one at a time on its main thread; the socket transport's messages run
    on threads of their own (actors/transports/unix_socket.py). Every method that touches the experts
    holds the actor's lock, so that neither kind sees the experts half-changed by the other."""

    def locked(method: Callable) -> Callable:
        @functools.wraps(method)
        def holding_lock(self, *args, **kwargs):
            with self.socket.lock:
                return method(self, *args, **kwargs)

        return holding_lock

    for name, attribute in list(vars(cls).items()):
        if callable(attribute) and not name.startswith("_") and name not in UNLOCKED:
            setattr(cls, name, locked(attribute))
    return cls


@_one_at_a_time
class ExpertActor:
    def __init__(
        self, model_dir: str, index: int, experts: dict[int, list[int]], torch_threads: int = 1,
        dtype: ComputeDtype = "auto", device: torch.device | None = None, pin_cores: bool = False,
    ):  # fmt: skip
        """`device`: where the experts live; by default the device Ray gave this actor. `pin_cores`: its
        graph pins its processes (a restarted actor pins itself again)."""
        torch.set_num_threads(torch_threads)
        self.torch_threads = torch_threads
        self.index = index
        self.model_dir = model_dir
        self.device = device or actor_device()
        self.dtype = compute_dtype(dtype, self.device)
        self.config = DeepseekV2Config.from_pretrained(model_dir)
        self.local = LocalExperts.from_pretrained(model_dir, self.config, experts, self.dtype, self.device)
        self.optimizer: NamedAdamW | None = None  # set by configure_training
        self.train_dtype = "float32"  # autocast of training forwards; set by configure_training
        self.reference: ReferenceWeights | None = None  # set by configure_reference (GRPO with β > 0)
        self.shared = SharedFiles()  # the routers' shared-memory files of this node
        self.socket = SocketServer(self._socket_message, torch_threads)
        self.cores = PinnedCores(torch_threads, self.device)  # claimed when the graph pins its processes
        if pin_cores:
            self.cores.pin_if_restarted()
        self.busy_s = 0.0  # wall seconds spent on data-path messages (receive, compute, answer) so far
        self.messages = 0

    def ready(self) -> dict:
        return {"index": self.index, "pid": os.getpid(), **where_this_computes(self.device),
                "dtype": str(self.dtype).removeprefix("torch."), "torch_threads": self.torch_threads,
                "cores": self.cores.cores,  # where its threads are held; None = wherever the kernel puts them
                "cpu_s": time.process_time(),  # CPU seconds of all its threads so far
                "busy_s": self.busy_s, "messages": self.messages,  # a round trip less this is the transport's
                "experts": self.held(),
                "parameter_bytes": sum(p.numel() * p.element_size() for p in self.local.named_parameters().values())}  # fmt: skip

    def held(self) -> dict[int, list[int]]:
        return {layer: sorted(int(e) for e in experts) for layer, experts in self.local.experts.items()}

    def pin_to_cores(self) -> list[int] | None:
        """Holds this actor's threads on cores of its own if it computes on the CPU (actors/cpu_affinity.py)."""
        return self.cores.pin()

    def open_socket(self) -> SocketAddress:
        """Where routers of this node send their messages over a Unix socket (the socket transport)."""
        return self.socket.open()

    def _socket_message(self, method: str, before: tuple, wire: Wire, after: tuple) -> tuple[Wire, int | None]:
        if method not in DATA_PATH:
            raise ValueError(f"{method!r} is not a data-path method")
        return getattr(self, method)(*before, wire, *after)

    # ---- the data path (object store and socket: numpy on the wire or shared memory; compiled graph:
    # tensors in shared memory) -----------------------------------------------------------------------
    @contextmanager
    def _busy(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.busy_s += time.perf_counter() - started
            self.messages += 1

    def forward(self, layer: int, tokens: Wire, counts: list[int]) -> tuple[Wire, None]:
        with self._busy():
            return self._answer(tokens, self._forward(layer, self._received(tokens), counts)), None

    def _forward(self, layer: int, tokens: Tensor, counts: list[int]) -> Tensor:
        """The experts in their own dtype on their own device; the answer in the tokens' dtype."""
        outputs = self.local.forward(layer, tokens.to(self.device, self.dtype), counts, keep_for_backward=False)[0]
        return outputs.to(tokens.dtype)

    def forward_compiled(self, message: tuple[int, WireTensor | Tensor | None, list[int]]) -> WireTensor | Tensor:
        """The compiled graph's entry: one (layer, tokens, counts) message per execution, the tokens
        as numpy (through host shared memory) or as tensors (NCCL), answered the same way. An idle
        actor gets tokens=None and answers a placeholder (zero-size tensors cannot cross a channel)."""
        layer, tokens, counts = message
        if tokens is None:
            return IDLE_REPLY
        with self._busy():
            if isinstance(tokens, WireTensor):
                return to_wire(self._forward(layer, from_wire(tokens, self.device), counts))
            return self._forward(layer, tokens, counts)

    def forward_train(self, layer: int, message: Wire, counts: list[int]) -> tuple[Wire, int]:
        with self._busy():
            tokens = self._received(message)
            with autocast(self.train_dtype, self.device):
                outputs, handle = self.local.forward(layer, tokens, counts, keep_for_backward=True)
            return self._answer(message, outputs.to(tokens.dtype)), handle  # bf16 autocast: in the tokens' dtype

    def backward(self, handle: int, grad_outputs: Wire) -> tuple[Wire, None]:
        """The gradient of the tokens, in the forward's reply shape (the transport reads both alike)."""
        with self._busy():
            return self._answer(grad_outputs, self.local.backward(handle, self._received(grad_outputs))), None

    def _received(self, message: Wire) -> Tensor:
        if isinstance(message, SharedTensor):
            return self.shared.tensor(message, self.device)
        return from_wire(message, self.device)

    def _answer(self, request: Wire, tensor: Tensor) -> Wire:
        """The answer the way the request came: through the router's shared-memory file when it fits."""
        if isinstance(request, SharedTensor):
            shared = self.shared.answer(request, tensor)
            if shared is not None:
                return shared
        return to_wire(tensor)

    # ---- parameters and gradients -------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        return {name: param.detach().clone() for name, param in self.local.named_parameters().items()}

    def grads(self) -> dict[str, Tensor]:
        return gradients(self.local.named_parameters())

    def zero_grad(self) -> None:
        zero_grads(self.local.named_parameters().values())

    def grad_sq_norm(self) -> float:
        return grad_sq_norm(self.local.named_parameters().values())

    # ---- placement changes ------------------------------------------------------------------------
    def expert_weights(self, layer: int, expert_ids: list[int]) -> dict[int, dict[str, Tensor]]:
        experts = self.local.experts[layer]
        return {e: {k: v.detach().clone() for k, v in experts[str(e)].state_dict().items()} for e in expert_ids}

    def set_experts(self, layer: int, keep: list[int], *incoming_parts: dict[int, dict[str, Tensor]]) -> None:
        """Hold exactly `keep` plus the incoming experts for this layer (inference only: optimizer state
        does not move)."""
        incoming = {e: weights for part in incoming_parts for e, weights in part.items()}
        if self.optimizer is not None:
            raise RuntimeError("experts cannot move while this actor holds optimizer state")
        current = self.local.experts[layer]
        updated = make_experts(self.config, sorted({*keep, *incoming})).to(self.device, self.dtype)
        with torch.no_grad():
            for e in keep:
                updated[str(e)].load_state_dict(current[str(e)].state_dict())
            for e, weights in incoming.items():
                updated[str(e)].load_state_dict(weights)
        self.local.experts[layer] = updated

    # ---- training: AdamW, mixed precision, checkpoint shards ----------------------------------------
    # (jobs/trainer.py drives these; the experts' gradients and AdamW state never leave this actor)
    def configure_training(self, optimizer: AdamWSettings, dtype: str = "float32") -> None:
        """AdamW over the experts held here, and the autocast dtype of training forwards (bf16 keeps
        fp32 master weights and AdamW state)."""
        self.optimizer = NamedAdamW(self.local.named_parameters(), optimizer)
        self.train_dtype = dtype

    def step(self, lr: float, grad_scale: float = 1.0) -> None:
        """One AdamW step (after the caller's global gradient clipping, as a scale), then zero grads."""
        self._configured_optimizer().step(lr, grad_scale)

    def save_shard(self, path: str) -> dict[str, int]:
        """Write this actor's experts as one safetensors file (HF names); returns name -> bytes."""
        return write_shard(self.local.named_parameters(), path)

    def save_optimizer(self, path: str) -> None:
        """AdamW state keyed by parameter name, so any placement can load its slice back."""
        self._configured_optimizer().save(path)

    def load_optimizer(self, paths: list[str]) -> int:
        """Take this actor's parameters' AdamW state from named state files; returns how many found."""
        return self._configured_optimizer().load(paths)

    # ---- GRPO: the reference's experts (π_ref), swapped in place for reference forwards -----------------
    def configure_reference(self) -> None:
        self.reference = ReferenceWeights(self.local.named_parameters())

    def use_reference(self, reference: bool) -> None:
        self.reference.use(reference)

    def reset_reference(self) -> None:
        self.reference.reset()

    def save_reference(self, path: str) -> dict[str, int]:
        return self.reference.save(path)

    def load_reference(self, directory: str) -> None:
        self.reference.load(directory)

    def _configured_optimizer(self) -> NamedAdamW:
        if self.optimizer is None:
            raise RuntimeError("configure_training first")
        return self.optimizer
