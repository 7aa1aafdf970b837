"""ClusterSpec: the shape of one actor graph."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from actors.devices import ComputeDtype, GpusPerActor
from actors.router import RouterSettings
from actors.transports import TransportName, TransportSettings


class GraphShape(BaseModel):
    """How many actors a graph has and what each gets. A training config and the serving app's arguments
    take these fields too (and hand them on with `graph_fields`)."""

    routers: int = Field(1, ge=1)
    expert_actors: int = Field(2, ge=1)
    cpus_per_actor: float | None = Field(
        None, gt=0, description="logical CPUs each actor reserves; None = up to 1, shared fairly on small nodes"
    )
    gpus_per_actor: GpusPerActor = None
    cpu_threads_per_actor: int = Field(1, ge=1, description="torch threads per actor on CPU")
    router_cpu_threads: int | None = Field(
        None, ge=1, description="torch threads of each router on CPU (it does all the dense work: give it more "
        "on a node with cores to spare; it keeps 1 while its expert actors work); None = cpu_threads_per_actor",
    )
    pin_cores: bool = Field(
        True, description="each router and expert actor computing on the CPU keeps its threads on as many cores of its "
        "own as it has torch threads, the ones its machine's other moeray processes hold least (actors/cpu_affinity.py): "
        "a hand-over then wakes no thread on another core; False = the kernel places them",
    )


class TransportChoice(BaseModel):
    """How the routers reach the expert actors (the serving app's arguments take these fields too)."""

    transport: TransportName = Field(
        "socket", description="a registered transport (actors/transports): socket (Unix sockets to the expert actors of "
        "the router's node, the object store to others), objectstore (ordinary actor calls) or compiled (a Ray "
        "Compiled Graph, inference only)",
    )
    compiled_timeout_s: float = Field(
        30.0, gt=0, description="compiled-graph submit/get timeout; past it the router falls back to the object store"
    )
    compiled_idle_release_s: float | None = Field(
        10.0, gt=0, description="a compiled graph unused this long is torn down (its actors' channel readers spin a "
        "core each while it stands) and compiled again by the next step; None = keep it",
    )


def graph_fields(config: BaseModel) -> dict[str, Any]:
    """The GraphShape and TransportChoice fields a wider config (training, serving) has, for ClusterSpec."""
    return {name: getattr(config, name) for base in (GraphShape, TransportChoice) if isinstance(config, base)
            for name in base.model_fields}  # fmt: skip


class ClusterSpec(GraphShape, TransportChoice):
    model: str = Field(description="model folder (config.json + safetensors) every actor reads its slice from")
    name: str = Field("moeray", description="prefix of the named actors; one graph per name and namespace")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how the graph's bundles (one per actor) are laid over nodes; SPREAD uses several nodes"
    )
    dtype: ComputeDtype = Field("auto", description="weights, cache and messages: auto = bf16 on GPUs, fp32 on CPU")
    extra_copies: int = Field(0, ge=0, description="redundant copies of hot experts per MoE layer")
    detached: bool = Field(False, description="outlive the driver (serving)")
    max_restarts: int = Field(3, ge=-1)
    max_task_retries: int = Field(3, ge=-1)

    @model_validator(mode="after")
    def _one_compiled_graph_per_actor(self) -> "ClusterSpec":
        if self.transport == "compiled" and self.routers > 1:
            raise ValueError("the compiled transport needs routers == 1: an actor can be in one compiled graph only")
        return self

    def router_settings(self) -> RouterSettings:
        return RouterSettings(
            transport=self.transport,
            transport_settings=TransportSettings(
                timeout_s=self.compiled_timeout_s, idle_release_s=self.compiled_idle_release_s
            ),
            cpu_threads=self.router_cpu_threads or self.cpu_threads_per_actor,
            dtype=self.dtype,
            extra_copies=self.extra_copies,
            pin_cores=self.pin_cores,
        )
