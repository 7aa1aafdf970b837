"""`moeray serve`, and what `moeray quickstart` (cli/quickstart.py) serves through: the actor graph, Ray
Serve and the OpenAI endpoint brought up from the command line, and taken down again leaving nothing."""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cluster.graph import ActorGraph, ensure_ray
from cluster.ray_logs import expected_record_silenced

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
    """What `start` brought up, as far as it got: `stop` takes down exactly that."""

    started_ray: bool
    host: str
    port: int
    grpc_port: int
    model: str
    api_key: str | None
    graph: ActorGraph | None = None
    created_graph: bool = False
    deployed: bool = False

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
    gpus_per_actor: float | None = None,
    engine: dict | None = None,
    ray_init: dict | None = None,
    quiet: bool = False,
) -> Running:
    """Join RAY_ADDRESS (or start an embedded cluster), attach to or create the graph `name`, start
    Serve's HTTP and gRPC proxies and run the application. The graph is created while Serve starts.
    From here on SIGINT and SIGTERM raise KeyboardInterrupt; whatever stops `start` half-way, what it
    brought up is taken down before the exception leaves."""
    from ray import serve

    from .app import AppArgs, attach_graph, build
    from .grpc_api import SERVICER_FUNCTION

    model_dir = model_dir.resolve()
    args = AppArgs(model=str(model_dir), name=name, served_model_name=served_model_name, api_keys=list(api_keys),
                   engine=engine or {}, expert_actors=expert_actors, routers=routers, cpus_per_actor=cpus_per_actor,
                   gpus_per_actor=gpus_per_actor)  # fmt: skip
    running = Running(_init_ray(ray_init, quiet), host, port, grpc_port, served_model_name or model_dir.name,
                      api_keys[0] if api_keys else None)
    _on_termination_signals(_interrupt)
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="moeray-graph") as pool:
            graph = pool.submit(attach_graph, args, model_dir)
            try:
                serve.start(
                    http_options={"host": host, "port": port},
                    grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
                )
            finally:
                running.graph, running.created_graph = graph.result()
        running.deployed = True
        # serve.run takes no HTTP or gRPC options, so they went to serve.start just above; serve.run then
        # finds that instance and logs that "new http_options ... will not be applied": they already were.
        with expected_record_silenced("ray.serve", "will not be applied"):
            serve.run(build(args), name=APP_NAME, route_prefix="/", blocking=False)
    except BaseException:
        stop(running)
        raise
    return running


def _init_ray(ray_init: dict | None, quiet: bool) -> bool:
    """Connect to Ray unless connected; True when this process started the cluster (embedded) rather
    than joining one (RAY_ADDRESS, `ray start`)."""
    if quiet:
        logging.getLogger("ray").setLevel(logging.WARNING)
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    options = dict(ray_init or {})
    if quiet:
        options.setdefault("log_to_driver", False)
        options.setdefault("logging_level", logging.WARNING)
    return ensure_ray(**options)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _on_termination_signals(sigint: Callable | int, sigterm: Callable | int | None = None) -> None:
    """SIGINT and SIGTERM (the same as SIGINT unless given) go to these handlers, whatever they did
    before: Ray's core worker answers SIGTERM with a stack dump and an abort that leaves Ray's processes
    running, and a script's `moeray serve &` starts with SIGINT ignored. Only the main thread can."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, sigint)
        signal.signal(signal.SIGTERM, sigint if sigterm is None else sigterm)


def stop(running: Running) -> None:
    """Delete the application (its replicas finish their requests; a second signal cuts that short),
    then, with further signals ignored, tear down the graph if `start` created it and Ray if `start`
    started it; then the signals do what they do in any Python program. On an embedded cluster
    Serve's controller and proxies end with Ray: serve.shutdown() would have its controller kill itself
    under the call that asked for it, which Ray reports as a failed task ("ServeController.graceful_
    shutdown failed ... killed by ray.kill")."""
    import ray
    from ray import serve

    try:
        if running.deployed:
            serve.delete(APP_NAME)
    finally:
        _on_termination_signals(signal.SIG_IGN)
        if running.created_graph:
            running.graph.teardown()
        if running.started_ray:
            ray.shutdown()
        _on_termination_signals(signal.default_int_handler, signal.SIG_DFL)


# ---- moeray serve -------------------------------------------------------------------------------
def serve_forever(model_dir: Path, expert_actors: int, routers: int, host: str, port: int, grpc_port: int,
                  api_keys: list[str], name: str, served_model_name: str | None, gpus_per_actor: float | None = None) -> None:
    from .keys import API_KEYS_ENV

    generated = None
    if not api_keys and not os.environ.get(API_KEYS_ENV):
        generated = "sk-moeray-" + secrets.token_urlsafe(24)
        api_keys = [generated]
    print(f"moeray: starting {model_dir} on {expert_actors} expert actors ...", flush=True)
    try:
        running = start(model_dir, expert_actors=expert_actors, routers=routers, host=host, port=port,
                        grpc_port=grpc_port, api_keys=api_keys, name=name, served_model_name=served_model_name,
                        gpus_per_actor=gpus_per_actor)
    except KeyboardInterrupt:  # start took down what it had brought up
        print("\nmoeray: stopped while starting", flush=True)
        return
    try:
        print(f"moeray: serving {running.model!r} at {running.base_url} (gRPC on port {grpc_port})", flush=True)
        if generated:
            print(f"moeray: API key (generated; pass --api-key to choose one): {generated}", flush=True)
        print("moeray: Ctrl-C (SIGINT) or SIGTERM to stop", flush=True)
        while True:
            signal.pause()
    except KeyboardInterrupt:
        print("\nmoeray: stopping ...", flush=True)
    finally:
        stop(running)
