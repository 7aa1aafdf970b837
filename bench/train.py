"""Training throughput: tokens/s of the same optimizer steps through the actor graph vs in one process.

    python -m bench.train [--config jobs/configs/arith-tiny.yaml] [--steps 20] [--rounds 4] [--expert-actors 2]

Runs in phases, one graph standing in each: its router on 1 torch thread, then on the machine's cores
(one phase, with the thread count `--set router_cpu_threads=N` sets), as the one-process runs take 1
and all cores. Each phase prints JSON lines: one per one-process run (torch threads 1 and the machine's
cores), then the actor graph's (embedded Ray, or RAY_ADDRESS) with its ratio to the phase's best
one-process run; the last line is the best phase's ratio, like against like: each side at its best
thread count. One graph at a time, because a standing graph slows a process beside it even while it
is idle (2 idle graphs slowed the one-process step on 2 threads from 94-97 to 132-151 ms here). Each run's
`phase_ms` is its mean step split as the trainer reports it (`seconds` in metrics.jsonl): forward,
backward, update and, on the graph (averaged over routers), expert_send / expert_wait (parts of forward
and backward), and expert_busy: the busiest expert actor's own time on its messages (receiving,
computing, answering), the part of expert_wait that is not Ray's transport. Same model, same
batches, same seeds; the first `--warmup` steps are not timed. The timed steps run in `--rounds`
alternating rounds (each run takes its next steps in turn), so that a change in the machine's load
falls on every run alike rather than on whichever happened to be running.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.args import non_negative_int, positive_int
from bench.readings import expert_readings


@dataclass
class Run:
    """One trainer stepping through the shared batches, a round at a time."""

    result: dict
    trainer: object
    torch_threads: int
    expert_actors: list = field(default_factory=list)  # the graph's, whose busy_s the timed steps add up
    next_step: int = 0
    timed_steps: int = 0
    seconds: float = 0.0
    tokens: int = 0
    last_loss: float = float("nan")
    phase_seconds: dict[str, float] = field(default_factory=dict)  # the timed steps' `seconds`, summed

    def steps(self, batches: list, count: int, lr: float, timed: bool) -> None:
        torch.set_num_threads(self.torch_threads)
        taken = range(self.next_step, self.next_step + count)
        busy_before = expert_readings(self.expert_actors, "busy_s") if timed and self.expert_actors else None
        start = time.perf_counter()
        for step in taken:
            ids, labels = batches[step]
            record = self.trainer.step(step, ids, labels, lr)
            self.last_loss = record["loss"]
            if timed:
                for phase, seconds in record["seconds"].items():
                    self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds
        if timed:
            self.seconds += time.perf_counter() - start
            if busy_before is not None:
                busy_after = expert_readings(self.expert_actors, "busy_s")
                busiest = max(after - before for after, before in zip(busy_after, busy_before))
                self.phase_seconds["expert_busy"] = self.phase_seconds.get("expert_busy", 0.0) + busiest
            self.timed_steps += count
            self.tokens += sum(batches[step][0].numel() for step in taken)
        self.next_step += count

    def summary(self) -> dict:
        return {**self.result, "tokens_per_s": round(self.tokens / self.seconds, 1),
                "step_s": round(self.seconds / self.timed_steps, 4), "timed_steps": self.timed_steps,
                "phase_ms": {phase: round(1e3 * total / self.timed_steps, 1) for phase, total in self.phase_seconds.items()},
                "last_loss": self.last_loss}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    parser = argparse.ArgumentParser(prog="python -m bench.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="jobs/configs/arith-tiny.yaml")
    parser.add_argument("--steps", type=positive_int, default=20, help="timed steps per run")
    parser.add_argument("--rounds", type=positive_int, default=4, help="the timed steps in this many alternating rounds")
    parser.add_argument("--warmup", type=non_negative_int, default=3)
    parser.add_argument("--expert-actors", type=positive_int, default=2)
    parser.add_argument("--routers", type=positive_int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from jobs.config import load_config_or_exit
    from jobs.data import TrainingData
    from jobs.sft import write_init
    from jobs.trainer import GraphTrainer, LocalTrainer
    from model import DeepseekV2ForCausalLM
    from model.tokenizer import ChatTokenizer

    config = load_config_or_exit(parser.prog, args.config, args.set)
    lr = config.schedule.lr
    per_round = -(-args.steps // args.rounds)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        folder = write_init(config.model_copy(update={"run_dir": tmp}), Path(tmp) / "init")
        data = TrainingData(config.data, ChatTokenizer.from_pretrained(folder), config.seq_len, config.seed)
        stream = data.batches(config.batch_size)
        batches = [next(stream)[:2] for _ in range(args.warmup + per_round * args.rounds)]
        n_params = sum(t.numel() for t in DeepseekV2ForCausalLM.from_pretrained(folder).state_dict().values())
        common = {"model_params": n_params, "batch_rows": config.batch_size, "seq_len": config.seq_len}

        cores = os.cpu_count() or 1
        chosen = "router_cpu_threads" in config.model_fields_set
        actors = args.expert_actors + args.routers  # their CPUs named: a graph just closed may not have given its back yet
        cpus_per_actor = config.cpus_per_actor or math.floor(100 * min(1.0, cores / actors)) / 100
        phases = []
        for router_threads in [config.router_cpu_threads] if chosen else sorted({1, cores}):
            runs = [Run({"mode": "one_process", "torch_threads": threads, **common},
                        LocalTrainer(config.model_copy(update={"expert_actors": 0, "routers": 1}), folder), threads)
                    for threads in sorted({1, cores})]  # fmt: skip
            graph_config = config.model_copy(  # on CPUs, as the one-process runs, also on a machine with GPUs
                update={"expert_actors": args.expert_actors, "routers": args.routers, "gpus_per_actor": 0,
                        "cpus_per_actor": cpus_per_actor, "router_cpu_threads": router_threads}  # fmt: skip
            )
            graph = GraphTrainer(graph_config, folder, name="bench-train")
            runs.append(Run({"mode": "actor_graph", "expert_actors": args.expert_actors, "routers": args.routers,
                             "cpu_threads_per_actor": graph_config.cpu_threads_per_actor,
                             "router_cpu_threads": router_threads, "pin_cores": graph_config.pin_cores,
                             "transport": graph_config.transport, **common}, graph, 1, graph.experts))  # fmt: skip
            try:
                for run in runs:
                    run.steps(batches, args.warmup, lr, timed=False)
                for _ in range(args.rounds):
                    for run in runs:
                        run.steps(batches, per_round, lr, timed=True)
            finally:
                graph.close()
            results = [run.summary() for run in runs]
            *local, graph_result = results
            best = max(local, key=lambda r: r["tokens_per_s"])
            graph_result |= {"ratio_vs_one_process": round(graph_result["tokens_per_s"] / best["tokens_per_s"], 3),
                             "one_process_torch_threads": best["torch_threads"], "one_process_step_s": best["step_s"],
                             "same_last_loss": abs(graph_result["last_loss"] - local[0]["last_loss"]) < 1e-5}  # fmt: skip
            for result in results:
                print(json.dumps(result), flush=True)
            phases.append(graph_result)
        best_phase = max(phases, key=lambda r: r["ratio_vs_one_process"])
        print(json.dumps({
            "ratio_graph_vs_one_process": best_phase["ratio_vs_one_process"],
            "one_process_torch_threads": best_phase["one_process_torch_threads"],
            "graph_router_cpu_threads": best_phase["router_cpu_threads"],
            "same_last_loss": all(phase["same_last_loss"] for phase in phases),
            "rounds": args.rounds,
            "cores": cores,
            "load_average": os.getloadavg(),
        }), flush=True)


if __name__ == "__main__":
    main()
