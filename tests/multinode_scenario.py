"""A graph over three simulated Ray nodes on this machine (ray.cluster_utils.Cluster), driven in a
process of its own because a driver joins one cluster and the test session already has one.

    python -m tests.multinode_scenario MODEL_DIR   ->  one JSON object on stdout

It reports, for each transport, whether greedy tokens equal one process and how the expert load
spread over nodes; then it removes the node of an expert actor while a generation runs and reports
whether the tokens are unchanged and how long the generation took against an undisturbed one; then it
removes the node of an expert actor while SFT runs and reports whether the run resumed from its newest
checkpoint and ended with the losses of an undisturbed run.

    python -m tests.multinode_scenario MODEL_DIR RUN_ROOT
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster

from cluster.graph import NAMESPACE, ActorGraph
from cluster.spec import ClusterSpec
from jobs import sft
from jobs.config import load_config
from model import DeepseekV2ForCausalLM

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "configs" / "smoke.yaml"

PROMPTS = [[5, 9, 3, 17], [7, 1, 4, 4, 8, 2, 6, 30, 31], [11]]
NEW_TOKENS = 24
WORKER_CPUS = 2


def start_cluster() -> tuple[Cluster, list]:
    """A head that hosts nothing of the graph (num_cpus=0, like KubeRay's head) and three workers."""
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=WORKER_CPUS) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, namespace=NAMESPACE)
    return cluster, workers


def tokens_across_nodes(model_dir: str, expected: list[list[int]]) -> dict:
    spec = ClusterSpec(model=model_dir, name="multinode", expert_actors=2, cpus_per_actor=1.0,
                       placement_strategy="STRICT_SPREAD")  # fmt: skip
    graph = ActorGraph.create(spec)
    router = graph.routers[0]
    report = {}
    try:
        for transport in ("objectstore", "socket", "compiled"):  # socket: no actor on the router's node: all fall back
            ray.get(router.set_transport.remote(transport))
            ray.get(router.reset_stats.remote())
            tokens = ray.get(router.generate.remote(PROMPTS, NEW_TOKENS))
            layers = ray.get(router.load_stats.remote())["layers"]
            report[transport] = {
                "tokens_equal": tokens == expected,
                "nodes_with_tokens": max(sum(1 for n in layer["tokens_per_node"].values() if n) for layer in layers.values()),
            }
        ray.get(router.set_transport.remote("objectstore"))
        nodes = [ray.get(actor.ready.remote())["node_id"] for actor in [*graph.experts, *graph.routers]]
        report["actor_nodes_distinct"] = len(set(nodes))
    finally:
        graph.teardown()
    return report


def node_loss(cluster: Cluster, workers: list, model_dir: str, expected: list[list[int]]) -> dict:
    """PACK-ed 2 expert actors + router with room to move: remove the node of expert actor 1 while a
    generation runs. Its placement-group bundle is rescheduled, Ray restarts the actor there (it
    reloads its slice from the checkpoint) and retries the calls the router was waiting on."""
    spec = ClusterSpec(model=model_dir, name="nodeloss", expert_actors=2, cpus_per_actor=0.5,
                       placement_strategy="SPREAD")  # fmt: skip
    graph = ActorGraph.create(spec)
    router = graph.routers[0]
    try:
        started = time.perf_counter()
        assert ray.get(router.generate.remote(PROMPTS, NEW_TOKENS)) == expected
        undisturbed_s = time.perf_counter() - started
        router_node = ray.get(router.ready.remote())["node_id"]
        victim = ray.get(graph.experts[1].ready.remote())["node_id"]
        if victim == router_node:  # keep the router: this scenario is about losing experts
            victim = ray.get(graph.experts[0].ready.remote())["node_id"]
        if victim == router_node:
            return {"skipped": "every expert actor shares the router's node"}
        node = next(w for w in workers if w.node_id == victim)
        started = time.perf_counter()
        pending = router.generate.remote(PROMPTS, NEW_TOKENS)
        cluster.remove_node(node)
        tokens = ray.get(pending, timeout=300)
        recovery_s = time.perf_counter() - started
        after = [ray.get(actor.ready.remote())["node_id"] for actor in graph.experts]
        return {
            "tokens_equal": tokens == expected,
            "undisturbed_s": round(undisturbed_s, 2),
            "with_node_loss_s": round(recovery_s, 2),
            "experts_left_the_lost_node": victim not in after,
        }
    finally:
        graph.teardown()


def training_after_node_loss(cluster: Cluster, workers: list, run_root: Path) -> dict:
    """SFT (the smoke config) on 1 router + 2 expert actors of 1 CPU each, so they span two nodes; once
    checkpoint-2 is written, the node of an expert actor that does not hold the router is removed. The
    run must resume from its newest checkpoint on a new graph over the surviving nodes and end with the
    losses of an undisturbed run."""
    workers.append(cluster.add_node(num_cpus=WORKER_CPUS))  # the generation's node loss took one
    cluster.wait_for_nodes()
    overrides = ["steps=60", "checkpoint_every=2", "cpus_per_actor=1", "plot=false", "progress=false",
                 "eval.arith_heldout=0"]  # fmt: skip
    straight = sft.train(load_config(SMOKE, [f"run_dir={run_root / 'straight'}", *overrides]))
    faulty_dir = run_root / "node-loss"
    outcome: dict = {}
    faulty = load_config(SMOKE, [f"run_dir={faulty_dir}", *overrides])
    run = threading.Thread(target=lambda: outcome.update(sft.train(faulty)))
    run.start()
    deadline = time.monotonic() + 240
    while not (faulty_dir / "checkpoint-2" / "trainer_state.json").exists():
        if not run.is_alive() or time.monotonic() > deadline:
            return {"skipped": "the run wrote no checkpoint-2"}
        time.sleep(0.05)
    named = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == NAMESPACE]
    node_of = {name: ray.get(ray.get_actor(name, namespace=NAMESPACE).ready.remote())["node_id"]
               for name in named if name.startswith("train-")}  # fmt: skip
    router_nodes = {node for name, node in node_of.items() if "-router-" in name}
    victims = [node for name, node in node_of.items() if "-expert-" in name and node not in router_nodes]
    if not victims:
        return {"skipped": "every expert actor shares the router's node"}
    removed_at = time.perf_counter()
    cluster.remove_node(next(w for w in workers if w.node_id == victims[0]))
    run.join(timeout=300)
    if run.is_alive():
        return {"hung": True}

    def losses(run_dir: Path) -> list[float]:
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    expected, got = losses(run_root / "straight"), losses(faulty_dir)
    return {
        "failures": outcome["failures"],
        "steps": len(got),
        "losses_equal": len(got) == len(expected) and all(abs(a - b) <= 1e-6 for a, b in zip(expected, got)),
        "finished_s_after_the_loss": round(time.perf_counter() - removed_at, 2),
        "undisturbed_run_s": straight["train_seconds"],
    }


def gpus_shared_over_nodes(cluster: Cluster, model_dir: str) -> dict:
    """Two nodes with one GPU each (Ray's resource only: no CUDA here) and a graph of 3 actors that asks
    for the default share: every actor must find a place on a GPU."""
    gpu_nodes = [cluster.add_node(num_cpus=WORKER_CPUS, num_gpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    spec = ClusterSpec(model=model_dir, name="multinode-gpus", expert_actors=2, gpus_per_actor=None)
    try:
        graph = ActorGraph.create(spec)
    except Exception as error:  # a placement group that can never be placed times out
        return {"created": False, "error": f"{type(error).__name__}: {error}"[:300]}
    try:
        described = ray.get([actor.ready.remote() for actor in [*graph.routers, *graph.experts]])
        gpu_node_ids = {node.node_id for node in gpu_nodes}
        return {"created": True, "gpus_per_actor": graph.spec.gpus_per_actor,
                "actors_with_a_gpu": sum(bool(d["gpu_ids"]) and d["node_id"] in gpu_node_ids for d in described)}
    finally:
        graph.teardown()


def main() -> None:
    model_dir, run_root = sys.argv[1], Path(sys.argv[2])
    expected = DeepseekV2ForCausalLM.from_pretrained(model_dir).generate(PROMPTS, NEW_TOKENS)
    cluster, workers = start_cluster()
    try:
        report = {"spread": tokens_across_nodes(model_dir, expected)}
        report["node_loss"] = node_loss(cluster, workers, model_dir, expected)
        report["training_node_loss"] = training_after_node_loss(cluster, workers, run_root)
        report["gpus"] = gpus_shared_over_nodes(cluster, model_dir)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    main()
