"""bench.report: the goals' table from benchmark outputs (records in the shapes the benches print)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import NotABenchOutput, build


def write_lines(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def dispatch_output(path: Path, objectstore_us: float, compiled_us: float, load: float, pin_cores: bool = True) -> Path:
    """A bench.dispatch --quick output: the local experts at 800 µs, the transports as given."""
    layer = {"kind": "layer", "batch": 1, "iters": 40, "p90_us": 0.0}
    decode = [{"kind": "decode", "backend": backend, "actors": 2, "batch": 8, "tok_s": tok_s, "step_ms": 8000 / tok_s}
              for backend, tok_s in (("one_process_1t", 900.0), ("one_process_2t", 1000.0), ("objectstore", 350.0),
                                     ("socket", 580.0), ("compiled", 620.0))]  # fmt: skip
    decode[-1]["first_step_ms"] = 25.0  # a freshly compiled graph's first generate
    return write_lines(path, [
        {"kind": "context", "cores": 2, "loadavg_start": [load, 1.0, 1.0]},
        {"kind": "config", "pin_cores": pin_cores},
        {"kind": "floor", "actors": 2, "transport": "objectstore", "batch": 1, "median_us": 1500.0},
        {**layer, "actors": 2, "transport_alive": "objectstore", "backend": "local", "median_us": 800.0},
        {**layer, "actors": 2, "transport_alive": "objectstore", "backend": "objectstore", "median_us": objectstore_us,
         "expert_busy_us_mean": 600.0},
        {**layer, "actors": 2, "transport_alive": "socket", "backend": "local", "median_us": 800.0},
        {**layer, "actors": 2, "transport_alive": "socket", "backend": "socket", "median_us": 1100.0},
        {**layer, "actors": 1, "transport_alive": "compiled", "backend": "local", "median_us": 800.0},
        {**layer, "actors": 1, "transport_alive": "compiled", "backend": "compiled", "median_us": compiled_us},
        *decode,
        {"kind": "idle", "actors": 2, "released_after_s": 4.5, "held_cores_per_actor": [0.9, 1.0],
         "released_cores_per_actor": [0.01, 0.03]},
        {"kind": "done", "loadavg_end": [load + 0.5, 1.0, 1.0]},
    ])  # fmt: skip


def train_output(path: Path, routers: int, graph_step_s: float, pin_cores: bool = True, transport: str | None = "socket",
                 router_threads: int | None = None) -> Path:
    one_process = [{"mode": "one_process", "torch_threads": t, "tokens_per_s": 1280 / s, "step_s": s}
                   for t, s in ((1, 0.130), (2, 0.100))]  # fmt: skip
    graph = {"mode": "actor_graph", "routers": routers, "expert_actors": 2, "tokens_per_s": 1280 / graph_step_s,
             "step_s": graph_step_s, "phase_ms": {"expert_wait": 40.0, "expert_busy": 25.0}, "pin_cores": pin_cores,
             "router_cpu_threads": router_threads, **({"transport": transport} if transport else {})}  # fmt: skip
    ratio = {"ratio_graph_vs_one_process": round(0.100 / graph_step_s, 3), "cores": 2, "load_average": [1.5, 1.0, 1.0]}
    return write_lines(path, [*one_process, graph, ratio])


def test_each_goal_gets_its_range_over_the_runs_and_how_many_runs_met_it(tmp_path):
    report = build([
        dispatch_output(tmp_path / "d1.jsonl", objectstore_us=3000.0, compiled_us=1700.0, load=0.7),
        dispatch_output(tmp_path / "d2.jsonl", objectstore_us=4200.0, compiled_us=1750.0, load=2.0),
        train_output(tmp_path / "t1.jsonl", routers=1, graph_step_s=0.125),
        train_output(tmp_path / "t2.jsonl", routers=1, graph_step_s=0.200),
        train_output(tmp_path / "t3.jsonl", routers=2, graph_step_s=0.110),
    ])  # fmt: skip
    figures = report.figures
    objectstore = figures["MoE layer, batch 1, above one process: object store, 2 expert actors"]
    assert objectstore.values == [2.2, 3.4] and objectstore.runs_meeting_goal == 1
    assert objectstore.context["Ray's floor"] == ("ms", [1.5, 1.5])
    assert objectstore.context["the busiest expert actor's own time (mean)"] == ("ms", [0.6, 0.6])
    compiled_context = figures["MoE layer, batch 1, above one process: compiled graph, 1 expert actor"].context
    assert list(compiled_context) == ["the experts in process"]  # no floor, no actor's time in these outputs
    compiled = figures["MoE layer, batch 1, above one process: compiled graph, 1 expert actor"]
    assert compiled.values == [0.9, 0.95] and compiled.status() == "met in all 2 runs"
    decode = figures["decode, batch 8, 2 expert actors, ÷ the best one-process run: compiled graph"]
    assert decode.values == [0.62, 0.62]  # over the 2-thread run, the faster one-process run
    assert decode.context["the first generate after the setup, a token"] == ("ms", [25.0, 25.0])
    assert figures["decode, batch 8, 2 expert actors, ÷ the best one-process run: object store"].status() == "**missed**"
    socket = figures["MoE layer, batch 1, above one process: socket, 2 expert actors"]
    assert socket.values == [0.3, 0.3] and socket.goal is None  # the issue sets goals for the other two
    assert figures["decode, batch 8, 2 expert actors, ÷ the best one-process run: socket"].status() == "**missed**"
    idle = figures["an idle compiled graph, 2 expert actors: cores per actor while it stands"]
    assert idle.goal is None and idle.values == [0.95, 0.95] and idle.context["once released"] == ("cores", [0.02, 0.02])
    training = figures["training tokens/s, 1 router + 2 expert actors ÷ the best one-process run"]
    assert training.values == [0.8, 0.5] and training.status() == "met in 1 of 2 runs"
    assert training.context["graph step"] == ("ms", [125.0, 200.0])
    assert training.context["the busiest expert actor's own time"] == ("ms", [25.0, 25.0])
    assert figures["training tokens/s, 2 routers + 2 expert actors ÷ the best one-process run"].goal is None

    table = report.markdown()
    assert ("| 2.2–3.4 ms (2 runs: 2.2, 3.4); Ray's floor 1.5 ms; the experts in process 0.8 ms; the busiest expert "
            "actor's own time (mean) 0.6 ms | met in 1 of 2 runs |") in table
    assert ("| 0.5–0.8× (2 runs: 0.8, 0.5); graph step 125–200 ms; one process 100 ms; the graph's waiting for its "
            "experts 40 ms; the busiest expert actor's own time 25 ms | met in 1 of 2 runs |") in table
    assert table.index("MoE layer") < table.index("training tokens/s")  # the goals in the order
    assert table.endswith("Cores: 2; the 1-minute load average the runs recorded: 0.7–2.5.")


def test_runs_without_pinned_cores_or_on_the_object_store_get_figures_of_their_own(tmp_path):
    report = build([
        dispatch_output(tmp_path / "pinned.jsonl", objectstore_us=3000.0, compiled_us=1500.0, load=1.0),
        dispatch_output(tmp_path / "not.jsonl", objectstore_us=3400.0, compiled_us=1900.0, load=1.0, pin_cores=False),
        train_output(tmp_path / "t1.jsonl", routers=1, graph_step_s=0.125),
        train_output(tmp_path / "t2.jsonl", routers=1, graph_step_s=0.200, pin_cores=False),
        train_output(tmp_path / "t3.jsonl", routers=1, graph_step_s=0.160, transport="objectstore"),
        train_output(tmp_path / "t4.jsonl", routers=1, graph_step_s=0.250, pin_cores=False, transport=None),
        train_output(tmp_path / "t5.jsonl", routers=1, graph_step_s=0.125, router_threads=2),
    ])  # fmt: skip
    figures = report.figures
    assert figures["MoE layer, batch 1, above one process: compiled graph, 1 expert actor"].values == [0.7]
    assert figures["MoE layer, batch 1, above one process: object store, 2 expert actors"].values == [2.2]
    unpinned = figures["MoE layer, batch 1, above one process: object store, cores not pinned, 2 expert actors"]
    assert unpinned.values == [2.6] and unpinned.command == "python -m bench.dispatch --quick --no-pin-cores"
    assert "decode, batch 8, 2 expert actors, ÷ the best one-process run: compiled graph, cores not pinned" in figures
    assert figures["training tokens/s, 1 router + 2 expert actors ÷ the best one-process run"].values == [0.8]
    training = figures["training tokens/s, 1 router + 2 expert actors, cores not pinned ÷ the best one-process run"]
    assert training.values == [0.5] and training.command == "python -m bench.train --set pin_cores=false"
    objectstore = figures["training tokens/s, 1 router + 2 expert actors, object store ÷ the best one-process run"]
    assert objectstore.values == [0.625] and objectstore.command == "python -m bench.train --set transport=objectstore"
    older = figures["training tokens/s, 1 router + 2 expert actors, object store, cores not pinned ÷ the best one-process run"]
    assert older.values == [0.4]  # an output from before the socket transport, which has no "transport"
    assert older.command == "python -m bench.train --set transport=objectstore --set pin_cores=false"
    two_threads = figures["training tokens/s, 1 router + 2 expert actors, the router on 2 threads ÷ the best one-process run"]
    assert two_threads.values == [0.8] and two_threads.command == "python -m bench.train --set router_cpu_threads=2"
    table = report.markdown()
    assert table.index("compiled graph, 1 expert actor") < table.index("compiled graph, cores not pinned, 1 expert")
    assert table.index("cores not pinned, 1 expert") < table.index("training tokens/s, 1 router + 2 expert actors ÷")


def test_the_sft_row_takes_the_jobs_wall_time_and_its_held_out_score(tmp_path):
    result = {"steps": 1500, "train_seconds": 300.0, "wall_seconds": 960.0, "heldout_exact_match": 0.997,
              "loadavg": [1.2, 1.0, 1.0]}  # fmt: skip
    (tmp_path / "with_wall.json").write_text(json.dumps(result, indent=2))
    older = {k: v for k, v in result.items() if k not in ("wall_seconds", "loadavg")}
    (tmp_path / "without.json").write_text(json.dumps(older))
    report = build([tmp_path / "with_wall.json", tmp_path / "without.json"])
    wall = report.figures["SFT stage 1 of the bundled model (1500 steps): wall"]
    assert wall.values == [16.0] and wall.status() == "**missed**"  # 16 minutes: over the 15-minute goal
    steps_only = report.figures["SFT stage 1 of the bundled model (1500 steps): the steps' time (a result.json without wall_seconds)"]
    assert steps_only.values == [5.0] and steps_only.status() == "met"
    assert report.figures["SFT stage 1 of the bundled model: held-out exact match"].status() == "met in all 2 runs"
    assert report.loads == [1.2]


def test_the_long_prompt_row_is_the_worst_path_with_every_path_beside_it(tmp_path):
    output = write_lines(tmp_path / "long.jsonl", [
        {"machine": {"cores": 2, "loadavg": [0.5, 0.5, 0.5]}, "chunk": 2048},
        {"path": "forward", "tokens": 32768, "peak_bytes": 1},
        {"path": "forward", "peak_ratio": 1.9},
        {"path": "chunked", "peak_ratio": 3.8},
        {"machine_after": {"loadavg": [0.9, 0.5, 0.5]}},
    ])  # fmt: skip
    figure = build([output]).figures["peak memory of a prompt, 32K ÷ 16K tokens, the worst prefill path"]
    assert figure.values == [3.8] and figure.status() == "**missed**"  # closer to quadratic than linear
    assert figure.context == {"forward": ("×", [1.9]), "chunked": ("×", [3.8])}


def test_a_file_no_bench_wrote_or_one_cut_short_is_named_in_the_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not a benchmark\n")
    with pytest.raises(NotABenchOutput, match="notes.txt is not the output of"):
        build([tmp_path / "notes.txt"])
    cut = write_lines(tmp_path / "cut.jsonl", [{"kind": "context", "cores": 2}, {"kind": "layer", "batch": 1}])
    with pytest.raises(NotABenchOutput, match="cut.jsonl is an incomplete bench.dispatch output"):
        build([cut])


def test_a_train_run_over_both_router_thread_counts_is_its_best_phase_with_each_beside_it(tmp_path):
    def phase(router_threads: int, one_process_s: float, graph_s: float) -> list[dict]:
        one_process = {"mode": "one_process", "torch_threads": 2, "tokens_per_s": 1280 / one_process_s, "step_s": one_process_s}
        return [one_process, {"mode": "actor_graph", "routers": 1, "expert_actors": 2, "router_cpu_threads": router_threads,
                              "tokens_per_s": 1280 / graph_s, "step_s": graph_s, "pin_cores": True, "transport": "socket",
                              "ratio_vs_one_process": round(one_process_s / graph_s, 3), "one_process_step_s": one_process_s}]  # fmt: skip

    result = {"ratio_graph_vs_one_process": 0.8, "graph_router_cpu_threads": 2, "cores": 2}
    records = [*phase(1, 0.100, 0.160), *phase(2, 0.100, 0.125), result]
    figure = build([write_lines(tmp_path / "t.jsonl", records)]).figures[
        "training tokens/s, 1 router + 2 expert actors ÷ the best one-process run"
    ]
    assert figure.values == [0.8] and figure.command == "python -m bench.train" and figure.status() == "met"
    assert figure.context["graph step"] == ("ms", [125.0])  # the best graph run's
    assert figure.context["the router on 1 thread"] == ("×", [0.625])
    assert figure.context["the router on 2 threads"] == ("×", [0.8])
