"""Tensors on the wire between routers and expert actors: as numpy arrays, which Ray serializes
without a pickling copy (torch tensors are pickled through their storage, a copy each way)."""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from .shared_memory import SharedTensor

# Ray hands received arrays over as read-only buffers it owns; the experts never write into them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


class WireTensor(NamedTuple):
    data: np.ndarray  # the tensor's elements (bfloat16, which numpy lacks, travels as int16 bits)
    dtype: str


Wire = WireTensor | SharedTensor  # inline, or left in shared memory on the sender's node (shared_memory.py)


def to_wire(tensor: Tensor) -> WireTensor:
    """Host memory on the wire: a tensor on a GPU is copied to the host first."""
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        return WireTensor(tensor.view(torch.int16).numpy(), "bfloat16")
    return WireTensor(tensor.numpy(), "")


def from_wire(message: WireTensor, device: torch.device) -> Tensor:
    """The tensor on the receiver's device (a no-op copy on the CPU)."""
    tensor = torch.from_numpy(message.data)
    tensor = tensor.view(torch.bfloat16) if message.dtype == "bfloat16" else tensor
    return tensor.to(device)
