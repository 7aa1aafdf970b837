"""Resident memory of each expert actor for 1, 2 and 4 expert actors, on a random checkpoint with
DeepSeek-V2-Lite's layer shapes (hidden 2048, 64 routed experts of width 1408, 2 shared, top-6), as
many layers as this machine holds (default 2: one dense, one MoE), bf16.

    RAY_AUTH_MODE=disabled python -m bench.expert_memory [--layers 2] [--actors 1,2,4]

Prints JSON lines: one per expert actor (resident set from /proc, the bytes of the expert parameters
it holds), then a summary per K with the mean resident set and its ratio to K=1; a slice should cost
about 1/K of the experts (plus the fixed cost of a torch process).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray
import torch

from bench.args import positive_int, positive_ints
from cluster.graph import NAMESPACE, ActorGraph
from cluster.spec import ClusterSpec
from model import DeepseekV2Config, DeepseekV2ForCausalLM


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def resident_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def write_checkpoint(folder: str, layers: int) -> DeepseekV2Config:
    config = DeepseekV2Config.preset("v2-lite", num_hidden_layers=layers, vocab_size=1024)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        DeepseekV2ForCausalLM(config).init_weights(seed=0).save_pretrained(folder)
    finally:
        torch.set_default_dtype(default)
    return config


def measure(folder: str, k: int) -> list[dict]:
    graph = ActorGraph.create(ClusterSpec(model=folder, name=f"memory-{k}", expert_actors=k, cpus_per_actor=0.2,
                                          gpus_per_actor=0, dtype="bfloat16", max_restarts=0))  # fmt: skip
    try:
        # Enough tokens that every expert runs: the slices are read from memory-mapped files, so only
        # experts that ran are resident until then.
        prompts = torch.randint(0, 1024, (16, 64), generator=torch.Generator().manual_seed(0)).tolist()
        ray.get(graph.routers[0].generate.remote(prompts, 2))
        rows = []
        for reply in ray.get([actor.ready.remote() for actor in graph.experts]):
            rss = resident_bytes(reply["pid"])
            rows.append({"actors": k, "actor": reply["index"], "rss_bytes": rss,
                         "expert_parameter_bytes": reply["parameter_bytes"],
                         "rss_beyond_experts_bytes": rss - reply["parameter_bytes"]})  # fmt: skip
        return rows
    finally:
        graph.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.expert_memory", description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=positive_int, default=2, help="decoder layers (the first is dense)")
    parser.add_argument("--actors", type=positive_ints, default=[1, 2, 4], help="expert actor counts, e.g. 1,2,4")
    args = parser.parse_args()
    if args.layers < 2:
        parser.error("--layers must be at least 2: the first decoder layer has no experts")
    counts = args.actors
    ray.init(address="local", num_cpus=4, include_dashboard=False, namespace=NAMESPACE, object_store_memory=512 * 1024**2)
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="moeray-bench-memory-") as folder:
            config = write_checkpoint(folder, args.layers)
            emit(kind="config", preset="v2-lite", layers=args.layers, moe_layers=config.moe_layers, dtype="bfloat16",
                 routed_expert_bytes=len(config.moe_layers) * config.n_routed_experts * 3 * config.hidden_size
                 * config.moe_intermediate_size * 2)  # fmt: skip
            summary = {}
            for k in counts:
                rows = measure(folder, k)
                for row in rows:
                    emit(kind="actor", **row)
                summary[k] = statistics.mean(row["rss_bytes"] for row in rows)
            for k, rss in summary.items():
                emit(kind="summary", actors=k, mean_rss_mib=round(rss / 2**20, 1),
                     ratio_to_one_actor=round(rss / summary[counts[0]], 3), ideal_ratio=round(counts[0] / k, 3))  # fmt: skip
    finally:
        emit(kind="done", wall_s=round(time.perf_counter() - started, 1), loadavg=os.getloadavg())
        ray.shutdown()


if __name__ == "__main__":
    main()
