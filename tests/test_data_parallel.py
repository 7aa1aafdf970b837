"""The routers' gradient averaging (actors/data_parallel.py) in two real gloo processes, without Ray."""

import multiprocessing as mp

import pytest
import torch
from torch import nn

from actors.data_parallel import DataParallelGroup, GradientAverager, rendezvous_address

RANKS = 2


def model_of(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4), nn.Linear(4, 4))


def rank_gradients(model: nn.Sequential, rank: int) -> None:
    """Rank r's batch; the last layer is used by rank 0 only (rank 1 has no gradient for it)."""
    torch.manual_seed(100 + rank)
    hidden = model[:5](torch.randn(8, 16))
    (model[5](hidden) if rank == 0 else hidden).pow(2).sum().backward()


def run_rank(rank: int, address: str, results: "mp.Queue") -> None:
    torch.set_num_threads(1)
    group = DataParallelGroup(rank, RANKS, address)
    model = model_of(0)
    params = list(model.parameters())
    averager = GradientAverager(group, params, first_bucket_bytes=16, bucket_bytes=1024)
    rank_gradients(model, rank)  # outside overlapping(): nothing starts
    started_unarmed = len(averager.reductions)
    model.zero_grad(set_to_none=True)
    with averager.overlapping():
        rank_gradients(model, rank)
    started_in_backward = len(averager.reductions)
    averager.wait()
    grads = [p.grad.numpy() for p in params]  # numpy: plain pickles, no shared-memory handles to outlive us
    results.put((rank, started_unarmed, started_in_backward, len(averager.buckets), grads))


@pytest.mark.timeout(120)
def test_gradients_are_averaged_bucket_by_bucket_while_backward_runs():
    context = mp.get_context("spawn")
    results = context.Queue()
    address = rendezvous_address("127.0.0.1")
    processes = [context.Process(target=run_rank, args=(rank, address, results)) for rank in range(RANKS)]
    for process in processes:
        process.start()
    got = dict((r[0], r[1:]) for r in (results.get(timeout=100) for _ in processes))
    for process in processes:
        process.join(timeout=30)
        assert process.exitcode == 0

    expected = []
    for rank in range(RANKS):
        model = model_of(0)
        rank_gradients(model, rank)
        expected.append([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters()])
    mean = [sum(grads) / RANKS for grads in zip(*expected)]
    for rank, (started_unarmed, started_in_backward, buckets, grads) in got.items():
        assert started_unarmed == 0
        # backward's order: [last bias] [last weight, 4x32 bias and weight, 32x32 bias] [32x32 weight]
        # (alone: over 1 KiB) [first bias] [first weight]
        assert buckets == 5
        # rank 1 never produces the last layer's gradient, so its first bucket (and with it every later
        # one, since buckets start in order) waits for wait(); rank 0 starts all of them in backward
        assert started_in_backward == (buckets if rank == 0 else 0)
        for got_grad, want in zip(grads, mean):
            torch.testing.assert_close(torch.from_numpy(got_grad), want, atol=1e-6, rtol=1e-6)
