"""A Serve application of the test's own on the session's cluster, and a client for it."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import openai
from ray import serve

from cluster.graph import ActorGraph
from cluster.spec import ClusterSpec
from serving.app import build
from serving.grpc_api import SERVICER_FUNCTION

from .local_ray import free_port

KEY_A, KEY_B = "sk-test-alice", "sk-test-bob"


@dataclass
class Server:
    port: int
    grpc_port: int
    model: str
    graph: ActorGraph

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, key: str = KEY_A) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=120)

    def raw(self, method: str, path: str, body: bytes | str | dict | None = None, key: str | None = KEY_A,
            headers: dict | None = None) -> tuple[int, dict]:
        """One plain HTTP request (for what the openai client would refuse to send)."""
        status, _, data = self.exchange(method, path, body, key, headers)
        return status, data

    def exchange(self, method: str, path: str, body: bytes | str | dict | None = None, key: str | None = KEY_A,
                 headers: dict | None = None) -> tuple[int, dict[str, str], dict]:
        """Status, response headers (lower-case names) and the JSON body (or {"raw": text})."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        all_headers = {"Content-Type": "application/json", **(headers or {})}
        if key is not None:
            all_headers["Authorization"] = f"Bearer {key}"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        response_headers = {name.lower(): value for name, value in response.getheaders()}
        try:
            return response.status, response_headers, json.loads(data)
        except json.JSONDecodeError:
            return response.status, response_headers, {"raw": data.decode(errors="replace")}


@contextmanager
def served_app(folder: Path, name: str, args: dict, expert_actors: int = 2) -> Iterator[Server]:
    """A graph named `name` (detached, as serving makes it), Serve's HTTP and gRPC proxies on free
    loopback ports, and the application built from `args` (keys KEY_A and KEY_B, model "tiny")."""
    graph = ActorGraph.create(
        ClusterSpec(model=str(folder), name=name, expert_actors=expert_actors, cpus_per_actor=0.5, detached=True)
    )
    port, grpc_port = free_port(), free_port()
    try:
        serve.start(
            http_options={"host": "127.0.0.1", "port": port},
            grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION]},
        )
        app = build({"model": str(folder), "name": name, "served_model_name": "tiny", "api_keys": [KEY_A, KEY_B],
                     "create_graph": False, **args})
        serve.run(app, name="moeray", route_prefix="/", blocking=False)
        yield Server(port, grpc_port, "tiny", graph)
    finally:
        serve.shutdown()
        graph.teardown()
