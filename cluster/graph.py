"""From a ClusterSpec to a running actor graph (named actors in one placement group), and back."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from actors.devices import on_distinct_gpus
from actors.expert import ExpertActor
from actors.placement import Placement
from actors.router import RouterActor
from actors.transports.objectstore import ObjectStoreTransport
from model import DeepseekV2Config

from .ray_logs import expected_record_silenced
from .spec import ClusterSpec

NAMESPACE = "moeray"
READY_TIMEOUT_S = 300
STOP_TIMEOUT_S = 30

# The graph's own processes, set here rather than by the user: expert messages up to 1 MiB travel inline
# with the call instead of through the object store (a decode step's are far smaller); and a router
# waits for its experts with ray.get on its step thread, which never blocks its event loop, so Ray's
# warning about blocking gets inside async actors does not apply.
GRAPH_ENV_VARS = {"RAY_max_direct_call_object_size": str(1024**2), "RAY_WARN_BLOCKING_GET_INSIDE_ASYNC": "0"}


def router_name(graph: str, index: int) -> str:
    return f"{graph}-router-{index}"


def expert_name(graph: str, index: int) -> str:
    return f"{graph}-expert-{index}"


def ensure_ray(**init_kwargs: Any) -> bool:
    """Join RAY_ADDRESS (`auto`: a cluster `ray start` began on this machine), else start an embedded
    one, never joining a cluster nobody named (whose `ray start` may belong to someone else, or be
    gone). Returns whether this process started the cluster (and so must leave nothing of it behind).

    An embedded cluster runs with Ray's token authentication, chosen here rather than left to Ray's
    default (which warns about it); setting RAY_AUTH_MODE yourself overrides the choice."""
    if ray.is_initialized():
        return False
    embedded = not os.environ.get("RAY_ADDRESS")
    if embedded and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        # Ray read its configuration (the auth mode with it) when it was imported: without reading it
        # again this process would talk to its own cluster without the token the cluster requires.
        ray._raylet.Config.initialize("")
    ray.init(address="local" if embedded else None, namespace=NAMESPACE, **init_kwargs)
    node = getattr(ray._private.worker, "_global_node", None)
    return bool(getattr(node, "head", False))


def cpu_share(actors: int) -> float:
    """Each actor's equal part of the cluster's free CPUs, up to 1 (in hundredths)."""
    share = min(1.0, ray.available_resources().get("CPU", 1.0) / actors)
    return math.floor(share * 100) / 100


def gpu_share(actors: int) -> float:
    """Each actor's part of the cluster's free GPUs, up to 1 (in hundredths): 1/k of a GPU for k actors
    per whole free GPU, so that the bundles fit however the GPUs are spread over nodes (an equal split
    of the total would not: 3 actors at 0.66 fit two one-GPU nodes only twice); under one free GPU, an
    equal split of it."""
    free = ray.available_resources().get("GPU", 0.0)
    share = 1 / math.ceil(actors / math.floor(free)) if free >= 1 else free / actors
    return math.floor(share * 100) / 100


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
        n_actors = spec.expert_actors + spec.routers
        if spec.cpus_per_actor is None:
            spec = spec.model_copy(update={"cpus_per_actor": cpu_share(n_actors)})
        if spec.gpus_per_actor is None:
            spec = spec.model_copy(update={"gpus_per_actor": gpu_share(n_actors)})
        bundle = {"CPU": spec.cpus_per_actor, **({"GPU": spec.gpus_per_actor} if spec.gpus_per_actor else {})}
        group = placement_group(
            [bundle] * n_actors,  # routers own a device too (dense weights, cache)
            strategy=spec.placement_strategy,
            name=f"{spec.name}-graph",
            lifetime="detached" if spec.detached else None,
        )
        ray.get(group.ready(), timeout=READY_TIMEOUT_S)
        # Graph actors are detached when serving (they outlive the driver), restartable (a crashed expert
        # comes back) and placed in a placement group (their resources, rescheduled when a node is lost).
        # Ray warns that removing the group kills them for good: that is exactly what `teardown` does.
        with expected_record_silenced("ray.actor", "restartable detached actor with a placement group"):
            experts, routers = cls._start_actors(spec, group, bundle, placement)
        return cls(spec, routers, experts, placement, group)

    @staticmethod
    def _start_actors(spec: ClusterSpec, group: PlacementGroup, bundle: dict, placement: Placement) -> tuple[list, list]:
        """Expert actors first (routers take their handles), each in its bundle of the group. With
        `pin_cores` each is then pinned in turn, routers first: on a node with fewer cores than the graph
        has processes, a router shares its core with the expert actors pinned last."""
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
                runtime_env={"env_vars": GRAPH_ENV_VARS},
                # No task events: serving calls these actors several times per decoded token (a router
                # step, expert forwards per MoE layer) and Ray keeps an event per call in the GCS (up to
                # 100,000 tasks), ~200 MiB of GCS memory in 10 minutes of serving (bench.soak). Serve
                # turns them off for its replicas for the same reason.
                enable_task_events=False,
            )

        experts = [
            ray.remote(ExpertActor)
            .options(**options(expert_name(spec.name, i), i, bundle))
            .remote(spec.model, i, placement.experts_of(i), spec.cpu_threads_per_actor, spec.dtype,
                    pin_cores=spec.pin_cores)
            for i in range(spec.expert_actors)
        ]
        ray.get([e.ready.remote() for e in experts], timeout=READY_TIMEOUT_S)
        expert_names = [expert_name(spec.name, i) for i in range(spec.expert_actors)]
        routers = [
            ray.remote(RouterActor)
            .options(**options(router_name(spec.name, r), spec.expert_actors + r, bundle))
            .remote(spec.model, r, expert_names, NAMESPACE, placement, spec.router_settings(), spec.model_dump())
            for r in range(spec.routers)
        ]
        ray.get([r.ready.remote() for r in routers], timeout=READY_TIMEOUT_S)
        if spec.pin_cores:
            for actor in [*routers, *experts]:  # one at a time, so that the claims come in this order
                ray.get(actor.pin_to_cores.remote(), timeout=READY_TIMEOUT_S)
        return experts, routers

    def init_data_parallel(self) -> None:
        """For training: join the routers into one torch.distributed group (the data-parallel ranks,
        which average their dense gradients among themselves); rank 0 picks where they meet. NCCL when
        every router has a GPU of its own, gloo otherwise (on CPUs, or routers sharing a GPU)."""
        address = ray.get(self.routers[0].rendezvous_address.remote())
        world = len(self.routers)
        backend = "nccl" if on_distinct_gpus(ray.get([router.ready.remote() for router in self.routers])) else "gloo"
        ray.get([router.init_data_parallel.remote(rank, world, address, backend) for rank, router in enumerate(self.routers)],
                timeout=READY_TIMEOUT_S)  # fmt: skip

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
        self._stop_compiled_graphs()
        for actor in [*self.routers, *self.experts]:
            ray.kill(actor, no_restart=True)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
        else:
            try:
                remove_placement_group(ray.util.get_placement_group(f"{self.spec.name}-graph"))
            except ValueError:
                pass

    def _stop_compiled_graphs(self) -> None:
        """A compiled graph keeps a loop task running on each expert actor; killed under it, Ray reports
        the task as failed on the driver's output. Routers that still answer end theirs first."""
        try:
            ray.get([r.set_transport.remote(ObjectStoreTransport.name) for r in self.routers],
                    timeout=STOP_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # a router that is gone or stuck is killed with the rest

