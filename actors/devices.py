"""The device an actor owns and the dtype it computes in, decided once when it starts.

Everything after that takes the device as an argument (model loading, the cache, messages), so the
code paths a CPU run exercises are the ones a GPU run takes."""

from __future__ import annotations

import warnings
from typing import Annotated, Literal

import ray
import torch
from pydantic import Field

# Autograd's GPU thread makes its first cuBLAS call in an expert actor's backward before it has made
# the GPU's context current; PyTorch then makes it current itself, and warns that it did.
warnings.filterwarnings("ignore", message="Attempting to run cuBLAS, but there was no current CUDA context")

ComputeDtype = Literal["auto", "float32", "bfloat16"]
GpusPerActor = Annotated[  # a config field: what each actor of a graph reserves
    float | None,
    Field(ge=0, description="GPUs per actor; 0 = CPU; None = the cluster's free GPUs shared out, up to 1 each"),
]


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here), or
    the CPU when it assigned none (also for a fraction of a GPU on a machine without CUDA)."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def where_this_computes(device: torch.device) -> dict:
    """This process's node, device and the GPU ids Ray gave it: what `on_distinct_gpus` compares (the
    actors' `ready()` answers include it)."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "device": str(device), "gpu_ids": ray.get_gpu_ids()}


def on_distinct_gpus(described: list[dict]) -> bool:
    """Whether every actor (`where_this_computes`) computes on a GPU of its own, as NCCL needs: actors
    given fractions of one GPU share it, and GPU ids repeat on every node."""
    gpus = [(d["node_id"], tuple(d["gpu_ids"])) for d in described if d["device"].startswith("cuda")]
    return len(gpus) == len(described) and len(set(gpus)) == len(gpus)


def compute_dtype(name: ComputeDtype, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
