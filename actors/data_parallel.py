"""The routers as data-parallel ranks: one torch.distributed process group (NCCL between distinct
GPUs, gloo on CPUs or where ranks share a GPU).

Rank 0 picks the rendezvous address (`rendezvous_address`, on its node), and whoever builds the graph
for training hands it to every rank (cluster/graph.py). The ranks then average their dense gradients
among themselves, as DDP does: bucket by bucket while backward is still running, so that the transfer
overlaps the rest of backward. The driver never sees a gradient, whatever the model's size.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn


# DDP's bucket sizes: a small first bucket, so that reducing starts early in backward, then larger ones,
# so that a large model is not reduced in thousands of small collectives.
FIRST_BUCKET_BYTES = 1 << 20
BUCKET_BYTES = 25 << 20


def rendezvous_address(host: str) -> str:
    """tcp://host:port with a port that is free on this node now (rank 0's store listens there)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return f"tcp://{host}:{probe.getsockname()[1]}"


class DataParallelGroup:
    """This process's rank among the data-parallel ranks. A single rank needs no process group: then
    summing leaves a number as it is (and a GradientAverager averages nothing)."""

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


class GradientAverager:
    """Each parameter's gradient -> its mean over the ranks, reduced while backward runs (DDP's scheme).

    The parameters are cut into buckets (the first of about `first_bucket_bytes`, the others of about
    `bucket_bytes`), in the reverse of their order (the order in which backward produces their
    gradients). Within `overlapping()`, a bucket's all-reduce starts as soon as backward has
    accumulated its last gradient; buckets start in the same order on every rank, since the ranks'
    collectives must match. `wait()` starts the buckets still missing a gradient (a parameter without
    one contributes zeros, as in DDP, so every rank reduces the same buffers), waits for all of them
    and makes each averaged slice the parameter's gradient (no copy back). A single rank has nothing to
    average: then both do nothing."""

    def __init__(
        self,
        group: DataParallelGroup,
        params: list[nn.Parameter],
        first_bucket_bytes: int = FIRST_BUCKET_BYTES,
        bucket_bytes: int = BUCKET_BYTES,
    ):
        self.group = group
        self.buckets: list[list[nn.Parameter]] = []
        size, cap = 0, 0  # an empty bucket of no room: the first parameter opens the first bucket
        for param in reversed(params) if group.world_size > 1 else []:
            if size + param.numel() * param.element_size() > cap:
                cap = bucket_bytes if self.buckets else first_bucket_bytes
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(param)
            size += param.numel() * param.element_size()
        self.bucket_of = {param: i for i, bucket in enumerate(self.buckets) for param in bucket}
        for param in self.bucket_of:
            param.register_post_accumulate_grad_hook(self._accumulated)
        self._reset()

    def _reset(self) -> None:
        self.armed = False
        self.ready: list[set[nn.Parameter]] = [set() for _ in self.buckets]
        self.reductions: list[tuple[torch.Tensor, dist.Work]] = []

    @contextmanager
    def overlapping(self) -> Iterator[None]:
        """Start reducing gradients as backward produces them (one backward inside)."""
        self.armed = bool(self.buckets)
        try:
            yield
        except BaseException:
            self._reset()
            raise
        self.armed = False

    def _accumulated(self, param: nn.Parameter) -> None:
        if not self.armed:
            return
        self.ready[self.bucket_of[param]].add(param)
        while len(self.reductions) < len(self.buckets):
            next_bucket = len(self.reductions)
            if len(self.ready[next_bucket]) < len(self.buckets[next_bucket]):
                break
            self._start(next_bucket)

    def _start(self, bucket: int) -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.buckets[bucket]]
        flat = torch.cat([grad.flatten() for grad in grads])
        self.reductions.append((flat, dist.all_reduce(flat, async_op=True)))

    def wait(self) -> None:
        for bucket in range(len(self.reductions), len(self.buckets)):
            self._start(bucket)
        for params, (flat, work) in zip(self.buckets, self.reductions):
            work.wait()
            flat /= self.group.world_size
            for param, chunk in zip(params, flat.split([p.numel() for p in params])):
                param.grad = chunk.view_as(param)
        self._reset()
