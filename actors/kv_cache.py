"""LatentKVCacheManager: the actor that keeps the books of the routers' latent-cache blocks.

The bookkeeping is `actors.block_manager.BlockManager` (no Ray); this actor gives it what needs Ray:
the routers' block pools (export, import and copy of blocks go straight to the router that holds
them) and the object-store offload tier between host memory and disk. It is created by
`cluster.cache_manager.start_cache_manager`.

Offloaded sessions that reach the disk tier are files in a folder of this actor's own, under
`offload_dir` (default: a folder per graph in the system's temp directory). The folder goes when the
manager closes; one left by a manager that died is removed by the next manager of that graph.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import ray
from pydantic import BaseModel, Field
from torch import Tensor

from .block_manager import Admission, BlockManager, DiskTier, HostTier


class CacheManagerConfig(BaseModel):
    num_blocks: int = Field(ge=1, description="blocks per router")
    block_size: int = Field(ge=1)
    bytes_per_token: int = Field(ge=1)
    host_offload_bytes: int = Field(64 * 1024**2, ge=0)
    object_store_offload_bytes: int = Field(64 * 1024**2, ge=0)
    offload_dir: str | None = Field(None, description="None = moeray-offload-<graph> in the system's temp directory")
    graph: str = Field("moeray", description="the graph's name (its default offload folder)")
    session_idle_s: float | None = Field(1800.0, gt=0, description="end sessions idle this long; None = never")
    max_sessions_per_owner: int | None = Field(1024, ge=1, description="past it a key's LRU idle session ends")

    def offload_root(self) -> Path:
        return Path(self.offload_dir or Path(tempfile.gettempdir()) / f"moeray-offload-{self.graph}")


class RouterBlocks:
    """The `BlockStore` of the routers' pools: each call waits for the router that holds the blocks."""

    def __init__(self, routers: list):
        self.routers = routers

    def export_blocks(self, router: int, blocks: list[int]) -> Tensor:
        return ray.get(self.routers[router].export_blocks.remote(blocks))

    def import_blocks(self, router: int, blocks: list[int], data: Tensor) -> None:
        ray.get(self.routers[router].import_blocks.remote(blocks, data))

    def copy_blocks(self, router: int, pairs: list[tuple[int, int]]) -> None:
        ray.get(self.routers[router].copy_blocks.remote(pairs))


class ObjectStoreTier:
    """Ray's object store (shared memory on the node, spilled by Ray when it fills)."""

    name = "object_store"

    def __init__(self, capacity_bytes: int | None):
        self.capacity_bytes = capacity_bytes

    def put(self, key: str, data: Tensor) -> ray.ObjectRef:
        return ray.put(data)

    def take(self, handle: ray.ObjectRef) -> Tensor:
        return ray.get(handle)


def _remove_orphans(root: Path, namespace: str) -> None:
    """Folders of cache managers that no longer run (each is named after its actor)."""
    for folder in root.iterdir() if root.is_dir() else ():
        try:
            ray.get_actor(folder.name, namespace=namespace)
        except ValueError:
            shutil.rmtree(folder, ignore_errors=True)


class LatentKVCacheManager:
    def __init__(self, routers: list, config: CacheManagerConfig):
        context = ray.get_runtime_context()
        root = config.offload_root()
        _remove_orphans(root, context.namespace)
        self.offload_dir = root / (context.get_actor_name() or context.get_actor_id())
        tiers = [
            HostTier(config.host_offload_bytes),
            ObjectStoreTier(config.object_store_offload_bytes),
            DiskTier(self.offload_dir),
        ]
        self.books = BlockManager(
            len(routers), config.num_blocks, config.block_size, config.bytes_per_token, RouterBlocks(routers), tiers,
            config.session_idle_s, config.max_sessions_per_owner,
        )

    def admit(self, seq_id: str, prompt: list[int], max_new_tokens: int, owner: str = "",
              session_id: str | None = None) -> Admission:
        return self.books.admit(seq_id, prompt, max_new_tokens, owner, session_id)

    def register_prefix(self, seq_id: str, tokens: list[int]) -> None:
        self.books.register_prefix(seq_id, tokens)

    def finish(self, seq_id: str, tokens: list[int]) -> None:
        self.books.finish(seq_id, tokens)

    def cancel(self, seq_id: str) -> None:
        self.books.cancel(seq_id)

    def check_session(self, owner: str, session_id: str) -> None:
        self.books.check_session(owner, session_id)

    def sessions_of(self, owner: str) -> list[dict]:
        return self.books.sessions_of(owner)

    def end_session(self, owner: str, session_id: str) -> None:
        self.books.end_session(owner, session_id)

    def reset_router(self, router: int) -> None:
        self.books.reset_router(router)

    def adopt(self, sequences: list[tuple[str, int, list[int]]]) -> None:
        self.books.adopt(sequences)
    def drop_prefixes(self) -> int:
        return self.books.drop_prefixes()

    def stats(self) -> dict:
        return {**self.books.stats(), "offload_dir": str(self.offload_dir)}

    def close(self) -> None:
        """Remove the offload folder (every session's files in it) before the actor goes."""
        shutil.rmtree(self.offload_dir, ignore_errors=True)
