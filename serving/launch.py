"""`moeray serve` and `moeray quickstart`: the actor graph, Ray Serve and the OpenAI endpoint, from
the command line (cli/main.py holds only the argument parsing)."""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
APP_NAME = "moeray"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def bundled_checkpoint() -> Path:
    """The best model shipped in checkpoints/: a trained one with a tokenizer when there is one, else
    the random tiny model."""
    root = PROJECT / "checkpoints"
    trained = sorted(p.parent for p in root.glob("*/tokenizer.json") if (p.parent / "config.json").exists())
    return trained[0] if trained else root / "tiny-random"


@dataclass
class Running:
    graph: object
    created_graph: bool
    started_ray: bool
    host: str
    port: int
    grpc_port: int
    model: str
    api_key: str | None

    @property
    def base_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}/v1"


def start(
    model_dir: Path,
    *,
    expert_actors: int = 2,
    routers: int = 1,
    host: str = "127.0.0.1",
    port: int = 8000,
    grpc_port: int = 9000,
    api_keys: list[str] = (),
    name: str = "moeray",
    served_model_name: str | None = None,
    cpus_per_actor: float | None = None,
    engine: dict | None = None,
    ray_init: dict | None = None,
    quiet: bool = False,
) -> Running:
    """Join RAY_ADDRESS (or start an embedded cluster), attach to or create the graph `name`, start
    Serve's HTTP and gRPC proxies and run the application. The graph is created while Serve starts."""
    from ray import serve

    from .app import build
    from .grpc_api import SERVICER_FUNCTION

    started_ray = _init_ray(ray_init, quiet)
    model_dir = model_dir.resolve()
    graph_ready = _attach_graph_in_background(model_dir, name, expert_actors, routers, cpus_per_actor)
    serve.start(
        http_options={"host": host, "port": port},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
    )
    graph, created = graph_ready()
    if Path(graph.spec.model).resolve() != model_dir:
        raise RuntimeError(f"a graph named {name!r} already serves {graph.spec.model}; pick another --name")
    args = {"model": str(model_dir), "name": name, "api_keys": list(api_keys), "engine": engine or {},
            "expert_actors": expert_actors, "routers": routers}
    if served_model_name:
        args["served_model_name"] = served_model_name
    try:
        serve.run(build(args), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        if created:
            graph.teardown()
        raise
    model = served_model_name or model_dir.name
    return Running(graph, created, started_ray, host, port, grpc_port, model, api_keys[0] if api_keys else None)


def _init_ray(ray_init: dict | None, quiet: bool) -> bool:
    """Connect to Ray unless connected; True when this process started the cluster (embedded) rather
    than joining one (RAY_ADDRESS, `ray start`)."""
    from cluster.graph import ensure_ray

    if quiet:
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    options = dict(ray_init or {})
    if quiet:
        options.setdefault("log_to_driver", False)
        options.setdefault("logging_level", logging.WARNING)
    return ensure_ray(**options)


def _attach_graph_in_background(model_dir: Path, name: str, expert_actors: int, routers: int,
                                cpus_per_actor: float | None) -> Callable[[], tuple[object, bool]]:
    """Find the graph `name` or create it (detached) on a thread; returns the function that waits for
    it: (graph, created here), or raises what went wrong."""
    from cluster.graph import ActorGraph
    from cluster.spec import ClusterSpec

    result: dict = {}

    def make_graph() -> None:
        try:
            try:
                result["graph"], result["created"] = ActorGraph.find(name), False
            except ValueError:
                spec = ClusterSpec(model=str(model_dir), name=name, expert_actors=expert_actors, routers=routers,
                                   cpus_per_actor=cpus_per_actor, detached=True)
                result["graph"], result["created"] = ActorGraph.create(spec), True
        except BaseException as error:  # reported on the caller's thread
            result["error"] = error

    builder = threading.Thread(target=make_graph, name="moeray-graph", daemon=True)
    builder.start()

    def wait() -> tuple[object, bool]:
        builder.join()
        if "error" in result:
            raise result["error"]
        return result["graph"], result["created"]

    return wait


def stop(running: Running) -> None:
    import ray
    from ray import serve

    try:
        if running.started_ray:
            serve.shutdown()
        else:  # a shared cluster: leave its Serve instance (and other applications) running
            serve.delete(APP_NAME)
    finally:
        if running.created_graph:
            running.graph.teardown()
        if running.started_ray:
            ray.shutdown()


# ---- moeray serve -------------------------------------------------------------------------------
def serve_forever(model_dir: Path, expert_actors: int, routers: int, host: str, port: int, grpc_port: int,
                  api_keys: list[str], name: str, served_model_name: str | None) -> None:
    from .keys import API_KEYS_ENV

    generated = None
    if not api_keys and not os.environ.get(API_KEYS_ENV):
        generated = "sk-moeray-" + secrets.token_urlsafe(24)
        api_keys = [generated]
    print(f"moeray: starting {model_dir} on {expert_actors} expert actors ...", flush=True)
    running = start(model_dir, expert_actors=expert_actors, routers=routers, host=host, port=port,
                    grpc_port=grpc_port, api_keys=api_keys, name=name, served_model_name=served_model_name)
    try:
        print(f"moeray: serving {running.model!r} at {running.base_url} (gRPC on port {grpc_port})", flush=True)
        if generated:
            print(f"moeray: API key (generated; pass --api-key to choose one): {generated}", flush=True)
        print("moeray: Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("\nmoeray: stopping ...", flush=True)
    finally:
        stop(running)


# ---- moeray quickstart --------------------------------------------------------------------------
def _say(text: str = "", end: str = "\n") -> None:
    sys.stdout.write(text + end)
    sys.stdout.flush()


def _stream_chat(client, model: str, messages: list[dict], **extra) -> tuple[str, dict, float, float]:
    started = time.monotonic()
    first = None
    parts: list[str] = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **extra
    )
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                first = first or time.monotonic()
                parts.append(choice.delta.content)
                _say(choice.delta.content, end="")
        if chunk.usage is not None:
            usage = chunk.usage.model_dump()
    _say()
    return "".join(parts), usage, (first or time.monotonic()) - started, time.monotonic() - started


def _usage_line(usage: dict, ttft: float, total: float) -> str:
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    out = usage["completion_tokens"]
    return (f"    [{usage['prompt_tokens']} prompt tokens ({cached} from the latent cache), {out} generated, "
            f"first token {ttft * 1000:.0f} ms, {out / max(total, 1e-9):.1f} tokens/s]")


def quickstart(model_dir: Path | None = None, expert_actors: int = 2, max_tokens: int = 24) -> None:
    """Embedded Ray, the bundled checkpoint on `expert_actors` expert actors, the OpenAI endpoint, a few
    streamed requests through the official `openai` client, the cache and expert statistics, shutdown."""
    import openai

    t0 = time.monotonic()
    model_dir = model_dir or bundled_checkpoint()
    api_key = "sk-moeray-" + secrets.token_urlsafe(16)
    _say(f"moeray quickstart: {model_dir.relative_to(PROJECT) if model_dir.is_relative_to(PROJECT) else model_dir}"
         f" on {expert_actors} expert actors + 1 router, Ray Serve in front (embedded Ray)")
    running = start(
        model_dir, expert_actors=expert_actors, port=free_port(), grpc_port=free_port(), api_keys=[api_key],
        name=f"quickstart-{os.getpid()}", ray_init={"include_dashboard": False}, quiet=True,
    )
    try:
        _say(f"endpoint up after {time.monotonic() - t0:.0f} s: {running.base_url} "
             f"(OpenAI-compatible; gRPC on port {running.grpc_port})\n")
        client = openai.OpenAI(base_url=running.base_url, api_key=api_key, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        _say(f"GET /v1/models -> {model}\n")

        question = [{"role": "user", "content": "What is 12 + 30?"}]
        _say(f"> chat (stream): {question[0]['content']}\n< ", end="")
        answer, usage, ttft, total = _stream_chat(client, model, question, max_tokens=max_tokens, temperature=0)
        _say(_usage_line(usage, ttft, total))

        follow_up = [*question, {"role": "assistant", "content": answer},
                     {"role": "user", "content": "What is 7 + 6?"}]
        session = {"extra_body": {"session_id": "quickstart"}}
        _say(f"> chat in session 'quickstart', turn 1: {question[0]['content']}\n< ", end="")
        answer, usage, ttft, total = _stream_chat(client, model, question, max_tokens=max_tokens, temperature=0,
                                                  **session)
        _say(_usage_line(usage, ttft, total))
        follow_up[1]["content"] = answer
        _say(f"> turn 2 (reuses the session's latent cache): {follow_up[2]['content']}\n< ", end="")
        _, usage, ttft, total = _stream_chat(client, model, follow_up, max_tokens=max_tokens, temperature=0, **session)
        _say(_usage_line(usage, ttft, total))

        _say("> completions, n=2, temperature 0.8, seed 7: 'Compute 3 minus 1'")
        result = client.completions.create(model=model, prompt="Compute 3 minus 1", n=2, max_tokens=max_tokens,
                                           temperature=0.8, seed=7)
        for choice in result.choices:
            _say(f"< [{choice.index}] {choice.text!r} ({choice.finish_reason})")

        request = urllib.request.Request(running.base_url + "/stats", headers={"Authorization": f"Bearer {api_key}"})
        with urllib.request.urlopen(request, timeout=30) as response:
            stats = json.loads(response.read())
        _say("\nlatent cache: " + _cache_line(stats.get("cache") or {}))
        _say("experts:")
        for layer, load in sorted(((stats.get("experts") or {}).get("layers") or {}).items(), key=lambda x: int(x[0])):
            _say(f"    layer {layer}: tokens per expert actor {load['tokens_per_actor']}, "
                 f"imbalance (max/mean) {load['imbalance']:.2f}, actors per token {load['actors_per_token_mean']:.2f}")
        if not (model_dir / "tokenizer.json").exists():
            _say("\n(note: this checkpoint is random weights with the built-in tokenizer, so the text is noise;"
                 " the serving path is the real one)")
    finally:
        _say("\nshutting down ...")
        stop(running)
    _say(f"quickstart finished in {time.monotonic() - t0:.0f} s")


def _cache_line(cache: dict) -> str:
    routers = cache.get("routers") or []
    used = sum(r.get("blocks_used", 0) for r in routers)
    total = sum(r.get("blocks_total", 0) for r in routers)
    return (f"{used}/{total} blocks of {cache.get('block_size', '?')} tokens in use, "
            f"{cache.get('bytes_per_token', '?')} bytes per token, prefix hit rate {cache.get('hit_rate', 0.0):.0%}, "
            f"{cache.get('sessions', 0)} session(s)")
