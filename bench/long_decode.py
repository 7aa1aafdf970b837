"""Per-token decode time over one long greedy sequence through the engine (1 router + 2 expert actors).

    RAY_AUTH_MODE=disabled python -m bench.long_decode [--tokens 1800] [--model DIR]

Prints one JSON line: the median step time (time between consecutive TokenEvents) of tokens 50–250
and of tokens 1550–1750, and their ratio (goal: at most 1.3, i.e. a step does not grow with the
length of what was generated); the same for the 10th percentile, which a loaded machine disturbs less. The model is a random tiny one (max_position_embeddings 2560) unless
--model says otherwise; no eos ids are passed, so the sequence runs to its length.
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

from bench.args import model_folder
from cluster.graph import ActorGraph, ensure_ray
from cluster.spec import ClusterSpec
from engine import Engine, EngineConfig
from engine.generation import GenerationRequest, Usage
from model import DeepseekV2Config, DeepseekV2ForCausalLM
from model.sampling import SamplingParams

EARLY = (50, 250)
LATE = (1550, 1750)


def tiny_model(directory: str, seed: int = 0) -> str:
    config = DeepseekV2Config.preset("tiny", initializer_range=0.1)
    DeepseekV2ForCausalLM(config).init_weights(seed=seed).save_pretrained(directory)
    return directory


async def decode_times(graph: ActorGraph, tokens: int) -> list[float]:
    """Seconds between consecutive tokens of one greedy sequence (index i: token i+1 after token i)."""
    engine = await Engine.create(graph, EngineConfig())
    try:
        request = GenerationRequest(request_id="long", prompt_ids=[3, 1, 4, 1, 5, 9, 2, 6], max_tokens=tokens,
                                    sampling=SamplingParams(temperature=0))
        stamps = [time.perf_counter() async for event in engine.generate(request) if not isinstance(event, Usage)]
    finally:
        await engine.shutdown()
    if len(stamps) != tokens:
        raise RuntimeError(f"{len(stamps)} tokens generated, {tokens} asked for")
    return [b - a for a, b in zip(stamps, stamps[1:])]


def window_ms(steps: list[float], window: tuple[int, int], quantile: float) -> float:
    first, last = window
    ordered = sorted(steps[first - 1 : last - 1])  # steps[i - 1]: the step that produced token i
    return 1000 * (statistics.median(ordered) if quantile == 0.5 else ordered[int(quantile * len(ordered))])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.long_decode", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=model_folder, default=None, help="model folder (default: a random tiny model)")
    parser.add_argument("--tokens", type=int, default=1800)
    args = parser.parse_args()
    if args.tokens < LATE[1]:
        parser.error(f"--tokens must be at least {LATE[1]}")
    model = args.model or tiny_model(tempfile.mkdtemp(prefix="moeray-long-decode-"))
    ensure_ray(num_cpus=4, include_dashboard=False, object_store_memory=256 * 1024**2)
    graph = ActorGraph.create(
        ClusterSpec(model=model, name="bench-long-decode", routers=1, expert_actors=2, cpus_per_actor=0.5)
    )
    try:
        started = time.perf_counter()
        steps = asyncio.run(decode_times(graph, args.tokens))
        elapsed = time.perf_counter() - started
    finally:
        graph.teardown()
        ray.shutdown()
    early, late = window_ms(steps, EARLY, 0.5), window_ms(steps, LATE, 0.5)
    early_p10, late_p10 = window_ms(steps, EARLY, 0.1), window_ms(steps, LATE, 0.1)
    print(json.dumps({
        "tokens": args.tokens,
        "seconds": round(elapsed, 2),
        f"median_step_ms_tokens_{EARLY[0]}_{EARLY[1]}": round(early, 3),
        f"median_step_ms_tokens_{LATE[0]}_{LATE[1]}": round(late, 3),
        "ratio": round(late / early, 3),
        "goal_ratio_at_most": 1.3,
        # The 10th percentile moves less with other processes' load than the median does.
        f"p10_step_ms_tokens_{EARLY[0]}_{EARLY[1]}": round(early_p10, 3),
        f"p10_step_ms_tokens_{LATE[0]}_{LATE[1]}": round(late_p10, 3),
        "p10_ratio": round(late_p10 / early_p10, 3),
        "machine": {"cores": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]},
    }), flush=True)


if __name__ == "__main__":
    main()
