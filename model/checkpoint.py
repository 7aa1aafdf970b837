"""Safetensors in Hugging Face names: single file or sharded with an index; partial reads.

An expert actor asks for its own experts' tensors only; `safe_open` maps the file and copies just
those, so no process ever materialises the whole model to load a slice of it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def tensor_files(directory: str | Path) -> dict[str, str]:
    """Tensor name -> file name, from the index when sharded."""
    path = Path(directory)
    if (path / INDEX_FILE).exists():
        return json.loads((path / INDEX_FILE).read_text())["weight_map"]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    names: dict[str, str] = {}
    for file in files:
        with safe_open(path / file, framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def load_tensors(
    directory: str | Path,
    names: Iterable[str],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Read exactly `names`; a missing name is an error that says which and where."""
    path = Path(directory)
    where = tensor_files(path)
    wanted = set(names)
    missing = sorted(wanted - where.keys())
    if missing:
        raise KeyError(f"{path}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    by_file: dict[str, list[str]] = {}
    for name in sorted(wanted):
        by_file.setdefault(where[name], []).append(name)
    tensors: dict[str, Tensor] = {}
    for file, file_names in by_file.items():
        with safe_open(path / file, framework="pt", device=str(device)) as f:
            for name in file_names:
                tensor = f.get_tensor(name)
                tensors[name] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    return tensors


def save_tensors(directory: str | Path, tensors: dict[str, Tensor], max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write one model.safetensors, or model-0000i-of-0000n.safetensors plus the index when larger."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    shard_bytes = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = tensor
        shard_bytes += size
    for stale in [*path.glob("model*.safetensors"), path / INDEX_FILE]:
        if stale.exists():
            os.remove(stale)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], path / SINGLE_FILE, metadata=metadata)
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, path / file, metadata=metadata)
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
