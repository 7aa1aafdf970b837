"""Faults under concurrent streaming requests: a part of a serving graph is killed while streams run.

    python -m bench.faults                   # embedded Ray, the bundled tiny model; every fault once
    python -m bench.faults --fault router --streams 8

For each fault it reports the streamed requests that completed, failed with a retryable error (503 or
429 with Retry-After, or that error inside the stream), failed otherwise or hung, and the seconds from
the kill until a new request is answered again. Printed as JSON. The tests
(tests/test_reliability.py) run the same scenarios and assert on their outcomes.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import requests

from bench.args import model_folder, positive_int

REQUEST_TIMEOUT_S = 120
RETRYABLE_CODES = {"engine_unavailable", "overloaded", "rate_limit_exceeded"}
RETRY_AFTER_S = 1.0  # what the server's Retry-After says for these


@dataclass
class Target:
    base_url: str
    key: str
    model: str
    graph: str  # the actor graph's name
    app: str = "moeray"  # the Serve application


def stream_once(target: Target, max_tokens: int = 24) -> str:
    """One streamed completion: "ok", "retryable", "error" (anything else) or "hung"."""
    body = {"model": target.model, "prompt": [3, 1, 4, 1, 5, 9, 2, 6], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    try:
        response = requests.post(f"{target.base_url}/v1/completions", json=body, stream=True, timeout=REQUEST_TIMEOUT_S,
                                 headers={"Authorization": f"Bearer {target.key}"})
        with response:
            if response.status_code != 200:
                return _classify_refusal(response)
            events = [line.removeprefix("data: ") for line in response.iter_lines(decode_unicode=True) if line]
    except requests.Timeout:
        return "hung"
    except requests.RequestException:
        return "error"
    if events[-1:] != ["[DONE]"]:
        return "error"
    chunks = [json.loads(e) for e in events[:-1]]
    errors = [c["error"] for c in chunks if "error" in c]
    if errors:
        return "retryable" if errors[0].get("code") in RETRYABLE_CODES else "error"
    return "ok" if chunks and chunks[-1].get("usage") else "error"


def _classify_refusal(response: requests.Response) -> str:
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return "error"
    retryable = response.status_code in (429, 503) and "retry-after" in response.headers and code in RETRYABLE_CODES
    return "retryable" if retryable else "error"


@dataclass
class FaultOutcome:
    fault: str
    outcomes: Counter = field(default_factory=Counter)  # ok / retryable / error / hung, over all streams
    recovery_s: float | None = None  # kill -> the first request answered "ok" again
    recovered_streams: bool = False  # every stream completed a request after the recovery

    def summary(self) -> dict:
        return {"fault": self.fault, "requests": sum(self.outcomes.values()), **dict(self.outcomes),
                "lost": self.outcomes["error"] + self.outcomes["hung"],
                "recovery_s": None if self.recovery_s is None else round(self.recovery_s, 2),
                "recovered_streams": self.recovered_streams}


def run_fault(target: Target, fault: str, kill: Callable[[], None], streams: int = 4,
              deadline_s: float = 300) -> FaultOutcome:
    """`streams` clients stream requests back to back; once each has completed one, `kill` runs; then
    until a new request succeeds (the recovery time) and every stream has completed another."""
    outcome, lock, stop = FaultOutcome(fault), threading.Lock(), threading.Event()
    ok_after: list[float] = []  # when streams' requests completed "ok", in order

    def client(index: int) -> None:
        while not stop.is_set():
            result = stream_once(target)
            with lock:
                outcome.outcomes[result] += 1
                if result == "ok":
                    ok_after.append(time.monotonic())
            if result == "retryable":
                stop.wait(RETRY_AFTER_S)  # as a client that honours Retry-After

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(streams)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + deadline_s
    try:
        _wait_for(lambda: len(ok_after) >= streams, deadline, "the streams never completed a request")
        killed_at = time.monotonic()
        kill()
        if not _wait_for(lambda: stream_once(target, max_tokens=2) == "ok", deadline, None):
            return outcome
        outcome.recovery_s = time.monotonic() - killed_at
        recovered_at = time.monotonic()
        _wait_for(lambda: sum(t > recovered_at for t in ok_after) >= streams, deadline, None)
        outcome.recovered_streams = sum(t > recovered_at for t in ok_after) >= streams
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=REQUEST_TIMEOUT_S + 10)
        outcome.outcomes["hung"] += sum(worker.is_alive() for worker in workers)
    return outcome


def _wait_for(condition: Callable[[], bool], deadline: float, failure: str | None) -> bool:
    """Poll `condition` until it holds or the deadline passes (then raise `failure`, or return False)."""
    while not condition():
        if time.monotonic() > deadline:
            if failure is not None:
                raise TimeoutError(failure)
            return False
        time.sleep(0.2)
    return True


# ---- the faults -----------------------------------------------------------------------------------
def kill_router(target: Target) -> None:
    """Kill router 0's process; Ray restarts it (with an empty block pool)."""
    import ray

    from cluster.graph import NAMESPACE, router_name

    ray.kill(ray.get_actor(router_name(target.graph, 0), namespace=NAMESPACE), no_restart=False)


def kill_cache_manager(target: Target) -> None:
    """Kill the graph's cache manager for good; the engine starts another."""
    import ray

    from cluster.graph import NAMESPACE

    prefix = f"{target.graph}-kv-cache-"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == NAMESPACE and a["name"].startswith(prefix)]
    for name in names:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)


def kill_engine_replica(target: Target) -> None:
    """Kill the EngineServer replica's actor; Serve's controller starts a new replica."""
    import ray

    from serving.app import ENGINE_DEPLOYMENT

    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].startswith(f"SERVE_REPLICA::{target.app}#{ENGINE_DEPLOYMENT}#"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)


FAULTS: dict[str, Callable[[Target], None]] = {
    "router": kill_router, "cache_manager": kill_cache_manager, "engine_replica": kill_engine_replica,
}


def main(argv: list[str] | None = None) -> int:
    from pathlib import Path

    from serving.launch import start, stop

    from .served import PROJECT, free_port

    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fault", choices=sorted(FAULTS), action="append", help="default: every fault")
    parser.add_argument("--streams", type=positive_int, default=4)
    parser.add_argument("--model", type=model_folder, default=str(PROJECT / "checkpoints" / "tiny-random"))
    args = parser.parse_args(argv)
    key, name = "sk-bench-faults", "bench-faults"
    running = start(Path(args.model), port=free_port(), grpc_port=free_port(), api_keys=[key], name=name,
                    ray_init={"include_dashboard": False}, quiet=True)
    try:
        target = Target(running.base_url.removesuffix("/v1"), key, running.model, name)
        results = [run_fault(target, fault, lambda: FAULTS[fault](target), args.streams).summary()
                   for fault in args.fault or sorted(FAULTS)]
    finally:
        stop(running)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
