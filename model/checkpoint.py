"""Safetensors in Hugging Face names: single file or sharded with an index; partial reads; the
shards and the one index writer of checkpoints whose owners write their own files (training).

An expert actor asks for its own experts' tensors only; `safe_open` maps the file and copies just
those, so no process ever materialises the whole model to load a slice of it.

A file that cannot be read (missing, truncated, corrupt) is a CheckpointError naming it, raised before
anything is returned: a load is whole or nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated or corrupt; the message names it."""


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path}: not readable JSON ({error})") from None


def read_torch_file(path: str | Path) -> Any:
    """torch.load of a file of tensors (optimizer and RNG states), or a CheckpointError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as error:  # unpickling a truncated or corrupt file raises many kinds
        raise CheckpointError(f"{path}: not a readable torch file ({error})") from None


def tensor_files(directory: str | Path) -> dict[str, str]:
    """Tensor name -> file name, from the index when sharded."""
    path = Path(directory)
    if (path / INDEX_FILE).exists():
        index = read_json(path / INDEX_FILE)
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path / INDEX_FILE}: no weight_map")
        return index["weight_map"]
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {path}")
    names: dict[str, str] = {}
    for file in files:
        with _open(path / file) as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def _open(path: Path, device: str = "cpu"):
    """safe_open, with the file named in any error (safetensors' own messages do not say which)."""
    try:
        return safe_open(path, framework="pt", device=device)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except Exception as error:  # SafetensorsError and OSError: a truncated or corrupt file
        raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from None


def load_tensors(
    directory: str | Path,
    names: Iterable[str],
    dtype: torch.dtype | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Read exactly `names` onto `device`; a missing name is an error that says which and where.
    safetensors reads straight onto a CPU or CUDA device; any other device gets a copy from the host."""
    path = Path(directory)
    device = torch.device(device)
    read_on = device if device.type in ("cpu", "cuda") else torch.device("cpu")
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
        with _open(path / file, str(read_on)) as f:
            missing = sorted(set(file_names) - set(f.keys()))
            if missing:
                raise CheckpointError(f"{path / file}: lacks {len(missing)} tensors its index names, e.g. {missing[:3]}")
            for name in file_names:
                try:
                    tensor = f.get_tensor(name)
                except Exception as error:
                    raise CheckpointError(f"{path / file}: cannot read tensor {name} ({error})") from None
                tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
                tensors[name] = tensor.to(device)
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
    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for file, shard in zip(files, shards):
        save_file(shard, path / file, metadata=metadata)
    write_index(path, {file: tensor_sizes(shard) for file, shard in zip(files, shards)})


def tensor_sizes(tensors: dict[str, Tensor]) -> dict[str, int]:
    return {name: t.numel() * t.element_size() for name, t in tensors.items()}


def write_shard(tensors: dict[str, Tensor], path: str | Path) -> dict[str, int]:
    """One safetensors file of a checkpoint whose owners write their own shards (a training
    checkpoint: the dense file, one file per expert actor), flushed to disk; returns name -> bytes
    for `write_index`."""
    tensors = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    save_file(tensors, str(path), metadata={"format": "pt"})
    fsync(path)
    return tensor_sizes(tensors)


def write_index(directory: str | Path, sizes: dict[str, dict[str, int]]) -> None:
    """model.safetensors.index.json over the files written (file -> {tensor name: bytes}), atomically."""
    weight_map = {name: file for file, names in sizes.items() for name in names}
    total = sum(n for names in sizes.values() for n in names.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(Path(directory) / INDEX_FILE, index)


def write_json_atomic(path: Path, data: object) -> None:
    """Write, flush to disk, then rename over `path`: a reader sees the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    fsync(tmp)
    os.replace(tmp, path)


def fsync(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
