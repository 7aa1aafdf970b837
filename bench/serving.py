"""Serving throughput and latency of the engine on the actor graph; multi-turn cache hit rate.

    RAY_AUTH_MODE=disabled python -m bench.serving [--quick] [--model DIR]

Prints JSON lines: per concurrency (1, 8, 32, 64) the aggregate output tokens/s, time to first token
and time per output token (median and p90, ms); then, with 1 and 2 routers, the prompt-token hit rate
of multi-turn conversations on sessions. Goals: >= 10x aggregate tokens/s at 32 vs 1; >= 90% hits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time

import ray

from bench.args import model_folder, positive_int
from cluster.graph import ActorGraph, ensure_ray
from cluster.spec import ClusterSpec
from engine import Engine, EngineConfig
from engine.generation import GenerationRequest, Usage
from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.sampling import SamplingParams


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(engine: Engine, request_id: str, prompt: list[int], max_tokens: int) -> dict:
    start = time.perf_counter()
    stamps = []
    request = GenerationRequest(
        request_id=request_id, prompt_ids=prompt, max_tokens=max_tokens, sampling=SamplingParams(temperature=0)
    )
    async for event in engine.generate(request):
        if not isinstance(event, Usage):
            stamps.append(time.perf_counter())
    ttft = stamps[0] - start
    tpot = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {"tokens": len(stamps), "ttft": ttft, "tpot": tpot}


async def throughput(engine: Engine, concurrency: int, requests: int, max_tokens: int, vocab: int) -> dict:
    queue = list(range(requests))
    results = []

    async def worker() -> None:
        while queue:
            i = queue.pop()
            prompt = [(i * 31 + j) % vocab for j in range(16 + i % 48)]
            results.append(await one_request(engine, f"c{concurrency}-{i}", prompt, max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {
        "concurrency": concurrency,
        "requests": requests,
        "output_tokens_per_s": round(sum(r["tokens"] for r in results) / elapsed, 2),
        "ttft_ms_median": round(1000 * statistics.median(r["ttft"] for r in results), 1),
        "ttft_ms_p90": round(1000 * percentile([r["ttft"] for r in results], 0.9), 1),
        "tpot_ms_median": round(1000 * statistics.median(r["tpot"] for r in results), 1),
        "tpot_ms_p90": round(1000 * percentile([r["tpot"] for r in results], 0.9), 1),
    }


async def multi_turn(engine: Engine, conversations: int, turns: int, vocab: int) -> dict:
    """Chats sharing a 48-token system prompt; each turn adds a 6-token user message to the history.
    Returns the hit rate of this workload alone (prompt tokens served from the cache / prompt tokens)."""
    before = (await engine.stats())["cache"]
    system = [(7 * j) % vocab for j in range(48)]

    async def conversation(c: int) -> None:
        history = system + [(c * 17 + j) % vocab for j in range(6)]
        for turn in range(turns):
            request = GenerationRequest(
                request_id=f"mt{c}-{turn}", prompt_ids=history, max_tokens=8,
                sampling=SamplingParams(temperature=0), owner="bench", session_id=f"conv{c}",
            )
            answer = [e.token_id async for e in engine.generate(request) if not isinstance(e, Usage)]
            history = history + answer + [(c + turn + j) % vocab for j in range(6)]

    await asyncio.gather(*(conversation(c) for c in range(conversations)))
    after = (await engine.stats())["cache"]
    prompt = after["prompt_tokens"] - before["prompt_tokens"]
    cached = after["cached_prompt_tokens"] - before["cached_prompt_tokens"]
    return {"conversations": conversations, "turns": turns, "prompt_tokens": prompt,
            "cached_prompt_tokens": cached, "multi_turn_hit_rate": round(cached / prompt, 4)}


async def main(args: argparse.Namespace) -> None:
    print(json.dumps({"machine": {"cores": os.cpu_count(), "loadavg": os.getloadavg()}, "model": args.model}))
    concurrencies = [1, 8] if args.quick else [1, 8, 32, 64]
    for routers in (1, 2):
        graph = ActorGraph.create(
            ClusterSpec(model=args.model, name=f"bench-serving-{routers}", routers=routers, expert_actors=2, cpus_per_actor=0.5)
        )
        engine = await Engine.create(graph, EngineConfig(max_batch_tokens=512, max_running=64))
        vocab = DeepseekV2Config.from_pretrained(args.model).vocab_size
        try:
            await one_request(engine, "warm-up", [1, 2, 3], 4)
            if routers == 1:
                for concurrency in concurrencies:
                    requests = max(2 * concurrency, 4) if not args.quick else concurrency
                    print(json.dumps({"routers": 1, **await throughput(engine, concurrency, requests, args.max_tokens, vocab)}), flush=True)
            hits = await multi_turn(engine, conversations=4 if args.quick else 8, turns=8, vocab=vocab)
            print(json.dumps({"routers": routers, **hits}), flush=True)
        finally:
            await engine.shutdown()
            graph.teardown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.serving", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=model_folder, default=None, help="model folder (default: a random tiny model)")
    parser.add_argument("--max-tokens", type=positive_int, default=32)
    parser.add_argument("--quick", action="store_true")
    arguments = parser.parse_args()
    if arguments.model is None:
        arguments.model = tempfile.mkdtemp(prefix="moeray-bench-")
        config = DeepseekV2Config.preset("tiny", initializer_range=0.1)
        DeepseekV2ForCausalLM(config).init_weights(seed=0).save_pretrained(arguments.model)
    ensure_ray(num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2)
    try:
        asyncio.run(main(arguments))
    finally:
        ray.shutdown()
