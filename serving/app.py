"""The Serve application: `serve run serving.app:build model=checkpoints/tiny-random`, a Serve config
(`serve run serving/configs/tiny.yaml`, the same YAML a RayService embeds), or `moeray serve`.

Two deployments:
- `EngineServer` (one replica): attaches to the actor graph named `name` (or creates it, detached, when
  none runs), holds the continuous-batching `Engine`, and streams token batches to the ingress. It
  measures TTFT / time per output token and publishes queue, cache and expert gauges.
- `OpenAIServer` (autoscaled): the FastAPI ingress `serving.openai_api.OpenAIIngress`, which also
  answers Serve's gRPC proxy (`serving.grpc_api`).

Health checks are cheap and never wait on a model step, so a busy replica is not restarted; a replica
that is still loading weights is in its constructor, which Serve does not health-check.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, field_validator
from ray import serve
from ray.serve import Application

from cluster.spec import GraphShape, TransportChoice

from engine.generation import (
    CacheError,
    EngineBatch,
    EngineError,
    EngineFailure,
    GenerationRequest,
    TokenEvent,
    Usage,
)
from .keys import API_KEYS_ENV, KeyRing, refuse_open_exposure, serve_listeners
from .model_info import ModelInfo, load_serving_tokenizer, resolve_model_dir
from .openai_api import DEFAULT_MAX_BODY_BYTES, OpenAIIngress

logger = logging.getLogger("ray.serve")

ENGINE_DEPLOYMENT = "EngineServer"
INGRESS_DEPLOYMENT = "OpenAIServer"


class AppArgs(GraphShape, TransportChoice):
    """Arguments of `build` (from `serve run ... key=value`, a config's `args:`, or Python); the graph's shape
    and transport are ClusterSpec's fields, used when this creates the graph."""

    model: str = Field(description="model folder (config.json + safetensors [+ tokenizer.json])")
    name: str = Field("moeray", description="actor-graph name: attach to this graph, or create it")
    served_model_name: str | None = Field(None, description="the `model` clients ask for; default: folder name")
    create_graph: bool = Field(True, description="create the graph (detached) when none runs under `name`")
    engine: dict = Field(default_factory=dict, description="engine.EngineConfig fields")
    api_keys: list[str] = Field(default_factory=list, description="also MOERAY_API_KEYS (comma-separated)")
    require_api_key: bool = Field(False, description="refuse to build without a key (api_keys or MOERAY_API_KEYS)")
    allow_unauthenticated: bool = Field(
        False, description="serve without an API key although the endpoint is reachable beyond this machine"
    )
    tokenizer: Literal["auto", "bundled", "none"] = "auto"
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request does not say (the engine's)")
    max_body_bytes: int = Field(DEFAULT_MAX_BODY_BYTES, ge=1024)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(32, gt=0)
    max_ongoing_requests: int = Field(256, ge=1)
    ingress_num_cpus: float = Field(0.0, ge=0)
    coalesce_s: float = Field(0.02, ge=0, description="under load, gather tokens this long per streamed chunk")
    busy_streams: int = Field(8, ge=0, description="'under load' = more open streams than this")
    stats_interval_s: float = Field(5.0, gt=0)

    @field_validator("api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [k for k in value.split(",") if k] if isinstance(value, str) else value


# ---- the engine replica -------------------------------------------------------------------------
_END = object()


@dataclass
class _Timing:
    started: float
    first_at: float | None = None
    last_at: float | None = None

    def tokens_arrived(self) -> None:
        self.last_at = time.monotonic()
        self.first_at = self.first_at or self.last_at


class EngineServerImpl:
    async def __init__(self, settings: dict):
        from model import DeepseekV2Config
        from engine import Engine, EngineConfig

        from .metrics import EngineMetrics

        args = AppArgs.model_validate(settings)
        model_dir = resolve_model_dir(args.model)
        config = DeepseekV2Config.from_pretrained(model_dir)
        self.graph, self.created_graph = attach_graph(args, model_dir)
        tokenizer = load_serving_tokenizer(model_dir, args.tokenizer, config.vocab_size)
        eos = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        eos_ids = {int(t) for t in eos if t is not None}
        if tokenizer is not None:
            eos_ids.add(tokenizer.eos_token_id)
        engine_config = EngineConfig.model_validate({**args.engine, "default_max_tokens": args.default_max_tokens})
        detokenize = None if tokenizer is None else tokenizer.decode
        self.engine = await Engine.create(self.graph, engine_config, detokenize, sorted(eos_ids))
        self.model_info = ModelInfo(
            name=args.served_model_name or model_dir.name,
            max_model_len=self.engine.max_model_len,
            vocab_size=config.vocab_size,
            created=int(time.time()),
            eos_token_ids=sorted(eos_ids),
            has_tokenizer=tokenizer is not None,
        )
        self.coalesce_s, self.busy_streams = args.coalesce_s, args.busy_streams
        self.open_streams = 0
        self.metrics = EngineMetrics(self.model_info.name)
        self._stats_interval = args.stats_interval_s
        self._stats_task = asyncio.create_task(self._publish_stats())
        logger.info("moeray engine ready: %s on graph %r (%d expert actors)", self.model_info.name, args.name,
                    self.graph.spec.expert_actors)

    async def info(self) -> ModelInfo:
        return self.model_info

    async def stats(self) -> dict:
        stats = await self.engine.stats()
        return {**stats, "open_streams": self.open_streams, "model": self.model_info.name}

    async def sessions(self, owner: str) -> list[dict]:
        return await self.engine.sessions(owner)

    async def end_session(self, owner: str, session_id: str) -> None:
        await self.engine.end_session(owner, session_id)

    async def check_health(self) -> None:
        """Cheap: never waits on a step. Unhealthy only when the engine's scheduling loop has died."""
        if not self.engine.healthy:
            raise RuntimeError("the engine loop stopped")

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineBatch]:
        """Batches of token events, the usage in the last one. A refused request raises its engine (or
        cache) exception instead of the first batch; the ingress maps it to HTTP."""
        queue: asyncio.Queue = asyncio.Queue()
        pump = asyncio.create_task(self._pump(request, queue))
        timing = _Timing(time.monotonic())
        outcome = "cancelled"
        self.open_streams += 1
        try:
            while True:
                batch, error, ended = await self._next_batch(queue)
                if batch.events:
                    timing.tokens_arrived()
                if batch.events or batch.usage is not None:
                    yield batch
                if error is not None:
                    outcome = "error" if isinstance(error, EngineFailure) else "refused"
                    raise error
                if batch.usage is not None:
                    outcome = "ok"
                    self._record(request, batch.usage, timing)
                    return
                if ended:
                    outcome = "error"
                    raise EngineFailure("the engine ended without usage")
        finally:
            self.open_streams -= 1
            self.metrics.finished.inc(1, {"outcome": outcome})
            if not pump.done():
                pump.cancel()

    async def _pump(self, request: GenerationRequest, queue: asyncio.Queue) -> None:
        try:
            async for item in self.engine.generate(request):
                queue.put_nowait(item)
        except (EngineError, CacheError) as error:
            queue.put_nowait(error)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # never a client's fault
            logger.exception("engine generate failed")
            queue.put_nowait(EngineFailure(f"internal error: {error}"))
        queue.put_nowait(_END)

    async def _next_batch(self, queue: asyncio.Queue) -> tuple[EngineBatch, Exception | None, bool]:
        """Everything queued, once there is something: events, usage, an error, the end. Under load it
        waits a little longer first, so a streamed chunk carries a few tokens."""
        items = [await queue.get()]
        if self.open_streams > self.busy_streams and self.coalesce_s:
            await asyncio.sleep(self.coalesce_s)
        while not queue.empty():
            items.append(queue.get_nowait())
        batch, error, ended = EngineBatch(), None, False
        for item in items:
            if isinstance(item, TokenEvent):
                batch.events.append(item)
            elif isinstance(item, Usage):
                batch.usage = item
            elif isinstance(item, Exception):
                error = item
            elif item is _END:
                ended = True
        return batch, error, ended

    def _record(self, request: GenerationRequest, usage: Usage, timing: _Timing) -> None:
        m = self.metrics
        try:
            for counter, value in ((m.prompt_tokens, usage.prompt_tokens), (m.cached_tokens, usage.cached_tokens),
                                   (m.completion_tokens, usage.completion_tokens)):
                if value > 0:  # ray counters refuse 0
                    counter.inc(value)
            if timing.first_at is not None:
                m.ttft.observe(timing.first_at - timing.started)
                per_choice = usage.completion_tokens / max(1, request.n)
                if per_choice > 1:
                    m.tpot.observe((timing.last_at - timing.first_at) / (per_choice - 1))
        except Exception as error:  # metrics never fail a request
            logger.warning("moeray: could not record metrics: %r", error)

    async def _publish_stats(self) -> None:
        while True:
            await asyncio.sleep(self._stats_interval)
            try:
                self.metrics.publish(await self.engine.stats(), self.open_streams)
            except Exception as error:  # statistics never take the server down
                logger.warning("moeray: could not publish engine stats: %r", error)

    async def __del__(self):
        self._stats_task.cancel()
        await self.engine.shutdown()


def attach_graph(args: AppArgs, model_dir: Path):
    """The running actor graph named args.name, or (args.create_graph) a new detached one; and whether
    it was created here."""
    from cluster.graph import ActorGraph
    from cluster.spec import ClusterSpec, graph_fields

    try:
        graph, created = ActorGraph.find(args.name), False
    except ValueError:
        if not args.create_graph:
            raise RuntimeError(f"no actor graph named {args.name!r} is running") from None
        spec = ClusterSpec(model=str(model_dir), name=args.name, detached=True, **graph_fields(args))
        graph, created = ActorGraph.create(spec), True
    if Path(graph.spec.model).resolve() != model_dir.resolve():
        raise RuntimeError(f"the graph {args.name!r} serves {graph.spec.model}, not {model_dir}: pick another name")
    return graph, created


# ---- the deployments and the builder ------------------------------------------------------------
_HEALTH = dict(health_check_period_s=10, health_check_timeout_s=60)

EngineServer = serve.deployment(
    EngineServerImpl,
    name=ENGINE_DEPLOYMENT,
    # One replica, as an autoscaling range of one: Ray Serve (2.60) warns "Cannot deregister autoscaling
    # state" whenever it deletes a deployment that has none, i.e. at every clean shutdown.
    autoscaling_config={"min_replicas": 1, "max_replicas": 1},
    max_ongoing_requests=4096,  # the engine queues and answers 429 itself (EngineConfig.max_queue)
    graceful_shutdown_timeout_s=30,
    ray_actor_options={"num_cpus": 0},
    **_HEALTH,
)

OpenAIServer = serve.deployment(
    OpenAIIngress,
    name=INGRESS_DEPLOYMENT,
    graceful_shutdown_timeout_s=30,
    **_HEALTH,
)


def build(args: dict | AppArgs) -> Application:
    """The Serve application for `serve run serving.app:build model=DIR [key=value ...]`."""
    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args)
    model_dir = resolve_model_dir(args.model)
    if not (model_dir / "config.json").exists():
        raise ValueError(f"{args.model} is not a model folder (no config.json)")
    keys = KeyRing(args.api_keys)
    if args.require_api_key and not keys.enabled:
        raise ValueError(f"this application requires an API key: set {API_KEYS_ENV} (comma-separated keys) "
                         "or pass api_keys")
    if not keys.enabled and not args.allow_unauthenticated:
        refuse_open_exposure(*serve_listeners())
    settings = args.model_dump()
    settings["model"] = str(model_dir)
    # Keys never travel as plain text: the ingress gets the digests of the keys given here and of
    # MOERAY_API_KEYS where the application is built, and reads MOERAY_API_KEYS on its own node too.
    ingress_settings = {
        "model_dir": str(model_dir),
        "tokenizer": args.tokenizer,
        "max_body_bytes": args.max_body_bytes,
        "api_key_digests": sorted(keys.digests),
    }
    settings["api_keys"] = []
    ingress = OpenAIServer.options(
        autoscaling_config={
            "min_replicas": args.min_replicas,
            "initial_replicas": max(1, args.min_replicas),
            "max_replicas": args.max_replicas,
            "target_ongoing_requests": args.target_ongoing_requests,
        },
        max_ongoing_requests=args.max_ongoing_requests,
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
    )
    return ingress.bind(EngineServer.bind(settings), ingress_settings)
