"""The serving part of an actor graph: the latent-cache manager actor over the routers' block pools."""

from __future__ import annotations

import uuid

import ray

from actors.kv_cache import CacheManagerConfig, LatentKVCacheManager

from .graph import NAMESPACE, ActorGraph


def start_cache_manager(graph: ActorGraph, config: CacheManagerConfig) -> ray.actor.ActorHandle:
    """A LatentKVCacheManager for this graph's routers (whose pools are already allocated). It lives as
    long as its creator or `stop_cache_manager`; it is never restarted by Ray (a fresh one would not know
    which blocks the routers' running sequences hold: its creator replaces it instead)."""
    return (
        ray.remote(LatentKVCacheManager)
        .options(name=cache_manager_name(graph.spec.name), namespace=NAMESPACE, num_cpus=0, max_restarts=0,
                 enable_task_events=False)  # as the graph's actors (cluster/graph.py)
        .remote(graph.routers, config.model_copy(update={"graph": graph.spec.name}))
    )


def cache_manager_name(graph: str) -> str:
    return f"{graph}-kv-cache-{uuid.uuid4().hex[:8]}"


async def stop_cache_manager(manager: ray.actor.ActorHandle) -> None:
    """Remove its offload files, then the actor (which may be gone already)."""
    try:
        await manager.close.remote()
    except ray.exceptions.RayActorError:
        pass
    ray.kill(manager, no_restart=True)
