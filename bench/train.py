"""Training throughput: tokens/s of the same optimizer steps through the actor graph vs in one process.

    python -m bench.train [--config jobs/configs/arith-tiny.yaml] [--steps 20] [--expert-actors 2]

Prints JSON lines: one per one-process run (torch threads 1 and the machine's cores), one for the actor
graph (embedded Ray, or RAY_ADDRESS), then the ratio graph / best one-process run. Same model, same
batches, same seeds; the first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch


def measure(trainer, batches, warmup: int, lr: float) -> dict:
    for step, (ids, labels) in enumerate(batches[:warmup]):
        trainer.step(step, ids, labels, lr)
    tokens, losses = 0, []
    start = time.perf_counter()
    for step, (ids, labels) in enumerate(batches[warmup:], start=warmup):
        losses.append(trainer.step(step, ids, labels, lr)["loss"])
        tokens += ids.numel()
    seconds = time.perf_counter() - start
    return {"tokens_per_s": round(tokens / seconds, 1), "step_s": round(seconds / (len(batches) - warmup), 4),
            "timed_steps": len(batches) - warmup, "last_loss": losses[-1]}


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/arith-tiny.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--expert-actors", type=int, default=2)
    parser.add_argument("--routers", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from jobs.config import load_config_or_exit
    from jobs.data import TrainingData
    from jobs.sft import write_init
    from jobs.trainer import GraphTrainer, LocalTrainer
    from model.tokenizer import ChatTokenizer

    config = load_config_or_exit(parser.prog, args.config, args.set)
    lr = config.schedule.lr
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = write_init(config.model_copy(update={"run_dir": tmp}), Path(tmp) / "init")
        data = TrainingData(config.data, ChatTokenizer.from_pretrained(folder), config.seq_len, config.seed)
        stream = data.batches(config.batch_size)
        batches = [next(stream)[:2] for _ in range(args.warmup + args.steps)]
        n_params = sum(t.numel() for t in __import__("model").DeepseekV2ForCausalLM.from_pretrained(folder).state_dict().values())
        common = {"model_params": n_params, "batch_rows": config.batch_size, "seq_len": config.seq_len}

        results = []
        cores = os.cpu_count() or 1
        for threads in sorted({1, cores}):
            torch.set_num_threads(threads)
            local = LocalTrainer(config.model_copy(update={"expert_actors": 0, "routers": 1}), folder)
            result = {"mode": "one_process", "torch_threads": threads, **common, **measure(local, batches, args.warmup, lr)}
            results.append(result)
            print(json.dumps(result), flush=True)
        torch.set_num_threads(1)

        graph_config = config.model_copy(update={"expert_actors": args.expert_actors, "routers": args.routers})
        graph = GraphTrainer(graph_config, folder, name="bench-train")
        try:
            result = {"mode": "actor_graph", "expert_actors": args.expert_actors, "routers": args.routers,
                      "cpu_threads_per_actor": graph_config.cpu_threads_per_actor, **common,
                      **measure(graph, batches, args.warmup, lr)}
        finally:
            graph.close()
        print(json.dumps(result), flush=True)
        best = max(results, key=lambda r: r["tokens_per_s"])
        print(json.dumps({
            "ratio_graph_vs_one_process": round(result["tokens_per_s"] / best["tokens_per_s"], 3),
            "one_process_torch_threads": best["torch_threads"],
            "same_last_loss": abs(result["last_loss"] - results[0]["last_loss"]) < 1e-5,
            "cores": cores,
            "load_average": os.getloadavg()[0],
        }), flush=True)


if __name__ == "__main__":
    main()
