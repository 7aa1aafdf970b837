"""The device an actor owns and the dtype it computes in, decided once when it starts.

Everything after that takes the device as an argument (model loading, the cache, messages), so the
code paths a CPU run exercises are the ones a GPU run takes."""

from __future__ import annotations

from typing import Literal

import ray
import torch

ComputeDtype = Literal["auto", "float32", "bfloat16"]


def actor_device() -> torch.device:
    """The GPU Ray assigned to this actor (Ray sets CUDA_VISIBLE_DEVICES, so it is cuda:0 here), or
    the CPU when it assigned none (also for a fraction of a GPU on a machine without CUDA)."""
    if ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def compute_dtype(name: ComputeDtype, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on a GPU, float32 on the CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)
