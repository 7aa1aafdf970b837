"""From a ClusterSpec to a running actor graph (named actors in one placement group), and back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.expert import ExpertActor
from actors.placement import Placement
from actors.router import RouterActor
from model import DeepseekV2Config

from .spec import ClusterSpec

NAMESPACE = "moeray"
READY_TIMEOUT_S = 300


def router_name(graph: str, index: int) -> str:
    return f"{graph}-router-{index}"


def expert_name(graph: str, index: int) -> str:
    return f"{graph}-expert-{index}"


def ensure_ray(**init_kwargs: Any) -> None:
    """Join RAY_ADDRESS when set, else start an embedded local cluster."""
    if not ray.is_initialized():
        ray.init(namespace=NAMESPACE, **init_kwargs)


@dataclass
class ActorGraph:
    spec: ClusterSpec
    routers: list
    experts: list
    placement: Placement
    placement_group: PlacementGroup | None = None

    @classmethod
    def create(cls, spec: ClusterSpec) -> "ActorGraph":
        ensure_ray()
        spec = spec.model_copy(update={"model": str(Path(spec.model).resolve())})
        config = DeepseekV2Config.from_pretrained(spec.model)
        placement = Placement.contiguous(
            config.n_routed_experts, spec.expert_actors, config.moe_layers, config.n_group if config.group_limited else 1
        )
        if spec.cpus_per_actor is None:
            n_actors = spec.expert_actors + spec.routers
            cpus = min(1.0, ray.available_resources().get("CPU", 1.0) / n_actors)
            spec = spec.model_copy(update={"cpus_per_actor": math.floor(cpus * 100) / 100})
        bundle = {"CPU": spec.cpus_per_actor, **({"GPU": spec.gpus_per_actor} if spec.gpus_per_actor else {})}
        group = placement_group(
            [bundle] * spec.expert_actors + [{"CPU": spec.cpus_per_actor}] * spec.routers,
            strategy="PACK",
            name=f"{spec.name}-graph",
            lifetime="detached" if spec.detached else None,
        )
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)

        def options(name: str, bundle_index: int, resources: dict) -> dict:
            return dict(
                name=name,
                namespace=NAMESPACE,
                lifetime="detached" if spec.detached else None,
                num_cpus=resources["CPU"],
                num_gpus=resources.get("GPU", 0),
                max_restarts=spec.max_restarts,
                max_task_retries=spec.max_task_retries,
                scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=bundle_index),
            )

        experts = [
            ray.remote(ExpertActor)
            .options(**options(expert_name(spec.name, i), i, bundle))
            .remote(spec.model, i, placement.experts_of(i), spec.cpu_threads_per_actor)
            for i in range(spec.expert_actors)
        ]
        ray.get([e.ready.remote() for e in experts], timeout=READY_TIMEOUT_S)
        routers = [
            ray.remote(RouterActor)
            .options(**options(router_name(spec.name, r), spec.expert_actors + r, {"CPU": spec.cpus_per_actor}))
            .remote(spec.model, r, experts, placement, spec.router_settings(), spec.model_dump())
            for r in range(spec.routers)
        ]
        ray.get([r.ready.remote() for r in routers], timeout=READY_TIMEOUT_S)
        return cls(spec, routers, experts, placement, group)

    @classmethod
    def find(cls, name: str = "moeray") -> "ActorGraph":
        """Attach to a running graph by name (e.g. from a Serve replica or another driver)."""
        ensure_ray()
        router = ray.get_actor(router_name(name, 0), namespace=NAMESPACE)
        description = ray.get(router.describe.remote())
        spec = ClusterSpec.model_validate(description["graph_spec"])
        routers = [ray.get_actor(router_name(name, r), namespace=NAMESPACE) for r in range(spec.routers)]
        experts = ray.get(router.get_expert_actors.remote())
        return cls(spec, routers, experts, Placement.model_validate(description["placement"]))

    def teardown(self) -> None:
        for actor in [*self.routers, *self.experts]:
            ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
        else:
            try:
                remove_placement_group(ray.util.get_placement_group(f"{self.spec.name}-graph"))
            except ValueError:
                pass

