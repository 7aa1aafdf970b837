"""MoE dispatch benchmark: per-layer round trip and decode tokens/s, in-process vs Ray transports.

    cd /work/main && RAY_AUTH_MODE=disabled timeout 900 python -m bench.dispatch            # full (batch 1, 64)
    cd /work/main && RAY_AUTH_MODE=disabled timeout 900 python -m bench.dispatch --quick    # ~3 min smoke run
    ... python -m bench.dispatch --actors 1,2,4                                              # also 4 expert actors

Prints JSON lines on stdout ("kind" says which):
- "context": cores, torch threads, load average at start; "config": the model and the method;
- "layer": one MoE layer's round trip as the router experiences it, median / p90 µs. It runs *inside the
  RouterActor process, on its step thread* (the thread generate() uses, so the objectstore path includes
  its event-loop hop): tokens x [batch, d] routed by the model's (random) gate
  and grouped by expert as DeepseekMoE.dispatch does, then `backend.submit(...).result()` is timed for the
  in-process LocalExperts (all experts of the layer, built in the router) and for RemoteExperts over the
  live transport (objectstore, socket, then compiled), round-robin per iteration. `transport_alive` says which
  transport was live (a compiled graph busy-polls: it slows everything else on a small node); setup_s is
  set_transport's time (the compile). The router measures it itself: `RouterActor.profile_dispatch`.
  The graph's processes are pinned to cores of their own (ClusterSpec.pin_cores; `--no-pin-cores`
  leaves them to the kernel), so the router's in-process "local" rows run pinned too.
  A remote row's expert_busy_us_mean is the busiest expert actor's own time on a round trip's message
  (receiving, computing, answering; warm-up included), the part that is not Ray's transport;
- "floor": Ray's own round trip under the same conditions: a caller actor (0.5 CPU, like the router) sends
  each of k echo actors (0.5 CPU, the graph's runtime environment, pinned as the graph is) a [batch, d]
  float32 numpy array (the graph's messages on a CPU) and waits for the answers, over ordinary calls
  (before any compiled graph stands, as in the object store's layer rows) and then over a compiled
  graph; nothing is computed. The "layer" rows minus the local experts' time, minus this, is what
  moeray itself adds;
- "decode": tokens/s of RouterActor.generate (ray.get from the driver) per transport, and of one process
  (DeepseekV2ForCausalLM.generate in the driver, torch threads 1 and all cores, run while the graph sits
  idle on the objectstore transport), interleaved per repeat so load drift hits all alike; ratio = graph /
  one process. One-token prompts, so all N forwards of generate(prompts, N) are decode steps; tok/s =
  batch * N / median time (step_ms_min: the best repeat, less sensitive to other users' load), timed
  after DECODE_WARMUP generates; first_step_ms: the first of those, right after the setup (for the
  compiled transport, a freshly compiled graph's);
- "idle": the cores each expert actor uses while a compiled graph stands idle (its channel readers spin),
  and once the router has released it (the graph's compiled_idle_release_s, 4 s here; 10 s by default).
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

from actors.cpu_affinity import PinnedCores
from actors.transports.compiled import tear_down_quietly
from bench.args import positive_ints
from bench.readings import expert_readings
from cluster.graph import GRAPH_ENV_VARS, NAMESPACE, ActorGraph
from cluster.spec import ClusterSpec
from model import DeepseekV2Config, DeepseekV2ForCausalLM

OVERRIDES = {  # tiny attention; experts big enough that their compute shows at batch 64
    "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 256, "num_hidden_layers": 3,
    "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2, "n_shared_experts": 1,
    "vocab_size": 1024, "bos_token_id": None, "eos_token_id": None,
}  # fmt: skip


# A freshly compiled graph's round trips are slow at first: on a 2-core machine its successive decode
# generates of 24 tokens took 19.8-21.6, 13.4-17.8, 11.4-16.1, then 9.6-13.6 ms a token (3 graphs).
LAYER_WARMUP = 50  # round trips before the timed ones, on every path (the floor's included)
DECODE_WARMUP = 4  # generates before the timed one, on every path
TRANSPORTS = ("objectstore", "socket", "compiled")
IDLE_RELEASE_S = 4.0  # compiled_idle_release_s of the bench's graphs
IDLE_WINDOW_S = 1.5  # how long the idle CPU use is measured


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def quantiles_us(samples_ns: list[int]) -> dict:
    s = sorted(samples_ns)
    return {"median_us": round(statistics.median(s) / 1e3, 1), "p90_us": round(s[int(0.9 * (len(s) - 1))] / 1e3, 1)}


def layer_rows(router, batches: list[int], warmup: int, iters: int) -> list[dict]:
    """RouterActor.profile_dispatch: in-process experts and the live transport, round-robin per iteration."""
    rows = ray.get(router.profile_dispatch.remote(batches, warmup, iters))
    return [{"backend": r["backend"], "batch": r["batch"], "iters": iters, **quantiles_us(r["round_trip_ns"])} for r in rows]


# ---- Ray's floor -------------------------------------------------------------------------------------
class Pinnable:
    def pin_to_cores(self) -> list[int] | None:
        """As the graph pins its processes (ClusterSpec.pin_cores)."""
        return PinnedCores(1, torch.device("cpu")).pin()


@ray.remote(num_cpus=0.5, runtime_env={"env_vars": GRAPH_ENV_VARS})
class Echo(Pinnable):
    """An expert actor that computes nothing: what carrying the message costs."""

    def forward(self, layer: int, tokens, counts: list[int]):
        return tokens, None

    def forward_compiled(self, message: tuple):
        return message[1]


@ray.remote(num_cpus=0.5, runtime_env={"env_vars": GRAPH_ENV_VARS})
class EchoCaller(Pinnable):
    def round_trips(self, actors: list, batches: list[int], hidden: int, warmup: int,
                    iters: int) -> list[dict]:
        """Over ordinary calls first, while no compiled graph stands (its readers would spin, and the object
        store's layer rows run with none), then over a compiled graph."""
        from ray.dag import InputNode, MultiOutputNode

        rows = self._round_trips("objectstore", lambda x: ray.get([a.forward.remote(1, x.numpy(), [len(x)]) for a in actors]),
                                 batches, hidden, warmup, iters)  # fmt: skip
        with InputNode() as inputs:
            dag = MultiOutputNode([a.forward_compiled.bind(inputs[i]) for i, a in enumerate(actors)])
        compiled = dag.experimental_compile()
        try:
            rows += self._round_trips("compiled", lambda x: ray.get(compiled.execute(*[(1, x.numpy(), [len(x)])] * len(actors))),
                                      batches, hidden, warmup, iters)  # fmt: skip
        finally:
            tear_down_quietly(compiled)
        return rows

    @staticmethod
    def _round_trips(transport: str, call, batches: list[int], hidden: int, warmup: int, iters: int) -> list[dict]:
        rows = []
        for batch in batches:
            tokens = torch.randn(batch, hidden)
            samples = []
            for _ in range(warmup + iters):
                start = time.perf_counter_ns()
                call(tokens)
                samples.append(time.perf_counter_ns() - start)
            rows.append({"transport": transport, "batch": batch, "round_trip_ns": samples[warmup:]})
        return rows


def floor_rows(k: int, batches: list[int], hidden: int, warmup: int, iters: int, pin_cores: bool) -> list[dict]:
    actors, caller = [Echo.remote() for _ in range(k)], EchoCaller.remote()
    try:
        if pin_cores:
            for actor in [caller, *actors]:  # in the graph's order: the caller is the router
                ray.get(actor.pin_to_cores.remote())
        rows = ray.get(caller.round_trips.remote(actors, batches, hidden, warmup, iters))
    finally:
        for actor in [*actors, caller]:
            ray.kill(actor)
    return [{"transport": r["transport"], "batch": r["batch"], "iters": iters, **quantiles_us(r["round_trip_ns"])}
            for r in rows]  # fmt: skip


# ---- decode ----------------------------------------------------------------------------------------
def decode_interleaved(runs: dict, batch: int, new_tokens: int, repeats: int, vocab: int) -> dict:
    """runs: name -> (setup, generate). Every repeat does each run's setup, DECODE_WARMUP generates as long
    as the timed one, then times generate(prompts, N). A compiled graph, rebuilt by each repeat's setup,
    is slow for its first few hundred executions (a served graph stays compiled): first_step_ms is the
    first warm-up generate's, right after the setup. One-token prompts: the "prefill" is a decode-shaped
    step too, so every one of the N forwards is a decode step (absorbed MLA, 1 token per sequence).
    Interleaved: load drift hits all alike."""
    prompts = torch.randint(3, vocab, (batch, 1), generator=torch.Generator().manual_seed(batch)).tolist()
    times = {name: [] for name in runs}
    first = {name: [] for name in runs}

    def timed(generate) -> float:
        start = time.perf_counter()
        generate(prompts, new_tokens)
        return time.perf_counter() - start

    for _ in range(repeats):
        for name, (setup, generate) in runs.items():
            setup()
            first[name].append(timed(generate))
            for _ in range(DECODE_WARMUP - 1):
                generate(prompts, new_tokens)
            times[name].append(timed(generate))
    return {name: {"tok_s": round(batch * new_tokens / statistics.median(t), 1),
                   "step_ms": round(1e3 * statistics.median(t) / new_tokens, 2),
                   "step_ms_min": round(1e3 * min(t) / new_tokens, 2),
                   "first_step_ms": round(1e3 * statistics.median(first[name]) / new_tokens, 2)}
            for name, t in times.items()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dispatch", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batch 1 and 8, few iterations (~3 min)")
    parser.add_argument("--no-pin-cores", action="store_true",
                        help="leave the graph's processes where the kernel puts them (pin_cores=False)")
    parser.add_argument("--actors", type=positive_ints, default=[1, 2], help="expert actor counts, e.g. 1,2,4")
    args = parser.parse_args()
    actors = args.actors
    batches = [1, 8] if args.quick else [1, 64]
    warmup, iters = LAYER_WARMUP, (40 if args.quick else 200)
    new_tokens, repeats = 24, 5  # a median of 5: one slow repeat does not decide it
    emit(kind="context", cores=os.cpu_count(), torch_threads=torch.get_num_threads(), loadavg_start=os.getloadavg(),
         torch=torch.__version__, ray=ray.__version__, quick=args.quick)  # fmt: skip
    config = DeepseekV2Config.preset("tiny", **OVERRIDES)
    emit(kind="config", preset="tiny", overrides=OVERRIDES, moe_layers=config.moe_layers, actors=actors,
         batches=batches, layer_warmup=warmup, layer_iters=iters, decode_new_tokens=new_tokens,
         decode_repeats=repeats, prompt_len=1, cpus_per_actor=0.5, cpu_threads_per_actor=1,
         pin_cores=not args.no_pin_cores)  # fmt: skip
    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2, namespace=NAMESPACE,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled"}})  # fmt: skip
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="moeray-bench-dispatch-") as folder:
            DeepseekV2ForCausalLM(config).init_weights(seed=0).save_pretrained(folder)
            model = DeepseekV2ForCausalLM.from_pretrained(folder)  # the one-process reference, in this driver
            for k in actors:
                for row in floor_rows(k, batches, config.hidden_size, warmup, iters, not args.no_pin_cores):
                    emit(kind="floor", actors=k, **row)
                spec = ClusterSpec(model=folder, name=f"bench-dispatch-{k}", expert_actors=k, cpus_per_actor=0.5,
                                   gpus_per_actor=0, compiled_idle_release_s=IDLE_RELEASE_S,
                                   pin_cores=not args.no_pin_cores)
                graph = ActorGraph.create(spec)
                try:
                    bench_graph(graph.routers[0], k, model, batches, (warmup, iters), (new_tokens, repeats))
                finally:
                    graph.teardown()
    finally:
        emit(kind="done", wall_s=round(time.perf_counter() - started, 1), loadavg_end=os.getloadavg())
        ray.shutdown()


def bench_graph(router, k: int, model, batches: list[int], layer_iters: tuple, decode_iters: tuple) -> None:
    experts = ray.get(router.get_expert_actors.remote())
    for transport in TRANSPORTS:  # the compiled graph last: its readers spin while it stands
        start = time.perf_counter()
        assert ray.get(router.set_transport.remote(transport)) == transport
        setup_s = round(time.perf_counter() - start, 2)
        for batch in batches:
            before = expert_readings(experts, "busy_s")
            rows = layer_rows(router, [batch], *layer_iters)
            after = expert_readings(experts, "busy_s")
            busiest_us = 1e6 * max(a - b for a, b in zip(after, before)) / sum(layer_iters)
            for row in rows:
                busy = {} if row["backend"] == "local" else {"expert_busy_us_mean": round(busiest_us, 1)}
                emit(kind="layer", actors=k, transport_alive=transport, setup_s=setup_s, **row, **busy)

    def use(transport: str, threads: int = 1):  # one-process runs only while no compiled graph spins
        return lambda: (torch.set_num_threads(threads), ray.get(router.set_transport.remote(transport)))

    def on_graph(prompts, n):
        return ray.get(router.generate.remote(prompts, n))

    runs = {f"one_process_{t}t": (use("objectstore", t), model.generate) for t in sorted({1, os.cpu_count()})}
    runs |= {t: (use(t), on_graph) for t in TRANSPORTS}
    for batch in batches:
        result = decode_interleaved(runs, batch, *decode_iters, model.config.vocab_size)
        for name, row in result.items():
            refs = [] if name.startswith("one_") else [r for r in result if r.startswith("one_")]
            ratios = {f"ratio_vs_{r}": round(row["tok_s"] / result[r]["tok_s"], 3) for r in refs}
            emit(kind="decode", backend=name, actors=k, batch=batch, **row, **ratios)
    emit(kind="idle", actors=k, transport="compiled", **idle_cpu(router, experts))
    ray.get(router.set_transport.remote("objectstore"))  # tears the compiled graph down


def idle_cpu(router, experts: list) -> dict:
    """Cores per expert actor while an idle compiled graph stands, then once the router released it."""

    def cores_used() -> list[float]:
        before, start = expert_readings(experts, "cpu_s"), time.perf_counter()
        time.sleep(IDLE_WINDOW_S)
        after, wall = expert_readings(experts, "cpu_s"), time.perf_counter() - start
        return [round((a - b) / wall, 2) for a, b in zip(after, before)]

    ray.get(router.set_transport.remote("compiled"))
    ray.get(router.generate.remote([[3]], 2))
    last_used = time.perf_counter()
    held = cores_used()
    while not ray.get(router.describe.remote())["transport_released"]:
        if time.perf_counter() - last_used > 10 * IDLE_RELEASE_S:
            raise RuntimeError("the idle compiled graph was never released")
        time.sleep(0.1)
    released_after_s = round(time.perf_counter() - last_used, 1)
    return {"release_after_s": IDLE_RELEASE_S, "held_cores_per_actor": held, "released_after_s": released_after_s,
            "released_cores_per_actor": cores_used()}  # fmt: skip


if __name__ == "__main__":
    main()
