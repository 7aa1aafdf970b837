"""The routers as data-parallel ranks: one torch.distributed process group (NCCL between distinct
GPUs, gloo on CPUs or where ranks share a GPU).

Rank 0 picks the rendezvous address (`rendezvous_address`, on its node), and whoever builds the graph
for training hands it to every rank (cluster/graph.py). The ranks then average their dense gradients
among themselves: the driver never sees a gradient, whatever the model's size.
"""

from __future__ import annotations

import socket

import torch
import torch.distributed as dist
from torch import nn


def rendezvous_address(host: str) -> str:
    """tcp://host:port with a port that is free on this node now (rank 0's store listens there)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"tcp://{host}:{probe.getsockname()[1]}"


class DataParallelGroup:
    """This process's rank among the data-parallel ranks. A single rank needs no process group: then
    averaging and summing leave everything as it is."""

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        address: str | None = None,
        device: torch.device | None = None,
        backend: str = "gloo",
    ):
        self.rank, self.world_size = rank, world_size
        self.device = device or torch.device("cpu")
        if world_size > 1:
            dist.init_process_group(backend, init_method=address, rank=rank, world_size=world_size)

    def average_gradients(self, params: list[nn.Parameter]) -> None:
        """Each parameter's gradient -> its mean over the ranks: one all-reduce of one flat buffer, whose
        slices become the gradients (no copy back). A parameter without a gradient contributes zeros, as
        in DDP, so that every rank reduces the same buffer."""
        if self.world_size == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([grad.flatten() for grad in grads])
        dist.all_reduce(flat)
        flat /= self.world_size
        for param, chunk in zip(params, flat.split([grad.numel() for grad in grads])):
            param.grad = chunk.view_as(param)

    def sum(self, value: float) -> float:
        """A number summed over the ranks (in float64)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return float(total)

    def share(self, items: list) -> list:
        """The items this rank looks after: every world_size-th one, from its rank on."""
        return items[self.rank :: self.world_size]
