"""The serving part of an actor graph: the latent-cache manager actor over the routers' block pools."""

from __future__ import annotations

import uuid

import ray

from actors.kv_cache import CacheManagerConfig, LatentKVCacheManager

from .graph import NAMESPACE, ActorGraph


def start_cache_manager(graph: ActorGraph, config: CacheManagerConfig) -> ray.actor.ActorHandle:
    """A LatentKVCacheManager for this graph's routers (whose pools are already allocated). It lives as
    long as its creator or `stop_cache_manager`."""
    return (
        ray.remote(LatentKVCacheManager)
        .options(name=f"{graph.spec.name}-kv-cache-{uuid.uuid4().hex[:8]}", namespace=NAMESPACE, num_cpus=0)
        .remote(graph.routers, config)
    )


def stop_cache_manager(manager: ray.actor.ActorHandle) -> None:
    ray.kill(manager, no_restart=True)
