"""Long prompts: peak memory of a prefill at 4K..32K tokens, to show it grows linearly, not quadratically.

    RAY_AUTH_MODE=disabled python -m bench.long_prompt [--lengths 4096 8192 16384 32768] [--paths ...]

The tiny model with DeepSeek-V2's YaRN (factor 40 over 4096 positions), random weights. Every
(path, length) runs in a fresh process; its peak is the rise of the process's resident-set high-water
mark (VmHWM, reset before the run) over the resident set once the model and the prompt exist, with
glibc's mmap threshold fixed so that freed tensors leave the resident set. Paths:
- forward: model(ids), no grad: the one-process prefill (one fused causal SDPA call per layer);
- generate: model.generate(prompt, 1): the prefill into the latent cache, then one decode step;
- chunked: the serving engine's prefill: RaggedBatch chunks of --chunk tokens, each over its cached
  prefix (256-query blocks, each masked over the keys it sees);
- train: forward and backward of a loss on every logit (one fused causal call and its backward);
- train_documents: the same on a packed row of 512-token documents with the document mask;
- engine: engine.Engine on 1 router + 2 expert actors (the router actor's peak; chunks of
  --chunk tokens as max_batch_tokens).

Prints one JSON line per run {"path", "tokens", "peak_bytes", "bytes_per_token", "seconds"}, then per
path the ratio of the peak at the two longest lengths ("peak_ratio"; 2.0 is linear, 4.0 quadratic),
next to the bytes a T x T fp32 score matrix of all heads would take.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # the bench's own cluster: chosen, not Ray's warning

import torch

from bench.args import positive_int
from model import DeepseekV2Config, DeepseekV2ForCausalLM, LatentCache, RaggedBatch

PATHS = ("forward", "generate", "chunked", "train", "train_documents", "engine")
DOCUMENT_TOKENS = 512
MMAP_THRESHOLD = 64 * 1024


def bench_config(max_tokens: int) -> DeepseekV2Config:
    return DeepseekV2Config.preset(
        "tiny",
        initializer_range=0.1,
        max_position_embeddings=max(2 * max_tokens, 8192),  # room for the prompt and its answer
        rope_scaling=DeepseekV2Config.preset("v2-lite").rope_scaling,
    )


def resident_bytes(pid: int | str = "self", field: str = "VmRSS") -> int:
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def reset_peak(pid: int | str = "self") -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as refs:
        refs.write("5")  # VmHWM := VmRSS


def chunked_prefill(model: DeepseekV2ForCausalLM, ids: torch.Tensor, chunk: int) -> None:
    cache, tables = LatentCache.for_batch(model.config, 1, ids.shape[1])
    for start in range(0, ids.shape[1], chunk):
        n = min(chunk, ids.shape[1] - start)
        batch = RaggedBatch(tables, [start], [n])
        model(ids[:, start : start + n], cache=cache, cache_batch=batch, logits_at=batch.last_tokens)


def run_in_process(path: str, tokens: int, chunk: int) -> dict:
    """Runs in the fresh child process."""
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(bench_config(tokens)).init_weights(seed=0)
    ids = torch.randint(0, model.config.vocab_size, (1, tokens))
    last = torch.tensor([tokens - 1])
    document_ids = torch.arange(tokens)[None] // DOCUMENT_TOKENS
    runs = {
        "forward": lambda: model(ids, logits_at=last),
        "generate": lambda: model.generate(ids.tolist(), max_new_tokens=1),
        "chunked": lambda: chunked_prefill(model, ids, chunk),
        "train": lambda: model(ids).logits.square().mean().backward(),
        "train_documents": lambda: model(ids, document_ids=document_ids).logits.square().mean().backward(),
    }
    grad = path.startswith("train")
    model.train(grad)
    base = resident_bytes()
    reset_peak()
    start = time.perf_counter()
    with torch.set_grad_enabled(grad):
        runs[path]()
    seconds = time.perf_counter() - start
    return {"peak_bytes": resident_bytes(field="VmHWM") - base, "seconds": seconds}


def run_engine(tokens: int, chunk: int) -> dict:
    """The serving engine's prefill of one prompt on 1 router + 2 expert actors; the router's peak."""
    import asyncio

    import ray

    from cluster.graph import NAMESPACE, ActorGraph
    from cluster.spec import ClusterSpec
    from engine import Engine, EngineConfig, GenerationRequest
    from model.sampling import SamplingParams

    folder = tempfile.mkdtemp(prefix="moeray-long-prompt-")
    config = bench_config(tokens)
    DeepseekV2ForCausalLM(config).init_weights(seed=0).save_pretrained(folder)
    cache_bytes = 2 * tokens * LatentCache.bytes_per_token(config)

    async def prefill() -> dict:
        graph = ActorGraph.create(
            ClusterSpec(model=folder, name="bench-long-prompt", routers=1, expert_actors=2, cpus_per_actor=0.5,
                        gpus_per_actor=0)
        )
        engine = await Engine.create(graph, EngineConfig(max_batch_tokens=chunk, cache_bytes_per_router=cache_bytes))
        try:
            router_pid = (await graph.routers[0].ready.remote())["pid"]
            prompt = torch.randint(0, config.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0))
            request = GenerationRequest(
                request_id="long", prompt_ids=prompt.tolist(), max_tokens=1, sampling=SamplingParams(temperature=0)
            )
            base = resident_bytes(router_pid)
            reset_peak(router_pid)
            start = time.perf_counter()
            [event async for event in engine.generate(request)]
            seconds = time.perf_counter() - start
            return {"peak_bytes": resident_bytes(router_pid, "VmHWM") - base, "seconds": seconds}
        finally:
            await engine.shutdown()
            graph.teardown()

    ray.init(address="local", num_cpus=4, include_dashboard=False, object_store_memory=512 * 1024**2, namespace=NAMESPACE)
    try:
        return asyncio.run(prefill())
    finally:
        ray.shutdown()


def measure(path: str, tokens: int, chunk: int) -> dict:
    command = [sys.executable, "-m", "bench.long_prompt", "--child", path, str(tokens), "--chunk", str(chunk)]
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed and then keeps later
    # ones on its heap, so the resident set would count memory already freed (up to 3x the live peak).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    child = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True, env=env)  # stderr passes through
    result = json.loads(child.stdout.strip().splitlines()[-1])
    return {
        "path": path,
        "tokens": tokens,
        "peak_bytes": result["peak_bytes"],
        "bytes_per_token": round(result["peak_bytes"] / tokens, 1),
        "seconds": round(result["seconds"], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.long_prompt", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--chunk", type=positive_int, default=2048, help="prefill chunk (chunked, engine)")
    parser.add_argument("--child", nargs=2, metavar=("PATH", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        path, tokens = args.child[0], int(args.child[1])
        result = run_engine(tokens, args.chunk) if path == "engine" else run_in_process(path, tokens, args.chunk)
        print(json.dumps(result))
        return

    config = bench_config(max(args.lengths))
    print(json.dumps({
        "machine": {"cores": os.cpu_count(), "loadavg": os.getloadavg(), "torch_threads": torch.get_num_threads()},
        "config": {"hidden_size": config.hidden_size, "heads": config.num_attention_heads,
                   "layers": config.num_hidden_layers, "rope_scaling": config.rope_scaling.model_dump()},
        "chunk": args.chunk,
    }), flush=True)
    for path in args.paths:
        peaks = {}
        for tokens in sorted(args.lengths):
            result = measure(path, tokens, args.chunk)
            peaks[tokens] = result["peak_bytes"]
            print(json.dumps(result), flush=True)
        longest, previous = sorted(peaks)[-1], sorted(peaks)[-2]
        print(json.dumps({
            "path": path,
            "peak_ratio": round(peaks[longest] / peaks[previous], 3),
            "between_tokens": [previous, longest],
            "dense_scores_bytes_at_longest": config.num_attention_heads * longest * longest * 4,
        }), flush=True)
    print(json.dumps({"machine_after": {"loadavg": os.getloadavg()}}), flush=True)


if __name__ == "__main__":
    main()
