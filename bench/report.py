"""The performance goals' table from benchmark outputs: each figure over the runs given, its goal, how
many runs met it, and the machine's load while they ran.

    python -m bench.dispatch --quick > bench-out/dispatch-1.jsonl     # each bench as many times as wanted
    python -m bench.train > bench-out/train-1.jsonl
    python -m bench.long_prompt > bench-out/long_prompt-1.jsonl
    python -m jobs.sft --config jobs/configs/arith-tiny.yaml          # writes runs/arith-tiny/result.json
    python -m bench.report bench-out/*.jsonl runs/arith-tiny/result.json

Each file is recognised by what it holds: `bench.dispatch`, `bench.train` or `bench.long_prompt` JSON
lines, or a `jobs.sft` result.json. Prints the table in Markdown (the README's performance table is
pasted from it); `--json` prints the figures as JSON lines instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

DISPATCH = "python -m bench.dispatch --quick"
DISPATCH_UNPINNED = f"{DISPATCH} --no-pin-cores"  # the graph's processes where the kernel puts them, for comparison
TRAIN = "python -m bench.train"
TRAIN_UNPINNED = f"{TRAIN} --set pin_cores=false"
TRAIN_OBJECTSTORE = f"{TRAIN} --set transport=objectstore"  # the transport before the socket one, for comparison
SFT = "python -m jobs.sft --config jobs/configs/arith-tiny.yaml"
LONG_PROMPT = "python -m bench.long_prompt"
COMMANDS = [DISPATCH, DISPATCH_UNPINNED, TRAIN, TRAIN_OBJECTSTORE, TRAIN_UNPINNED, SFT, LONG_PROMPT]  # the table's order


class NotABenchOutput(ValueError):
    """A file that none of the benchmarks (nor jobs.sft) wrote, or one cut short."""


@dataclass
class Goal:
    text: str
    met: Callable[[float], bool]


AT_MOST_2_5_MS = Goal("≤ 2.5 ms", lambda ms: ms <= 2.5)
AT_MOST_1_MS = Goal("≤ 1 ms", lambda ms: ms <= 1.0)
AT_LEAST_0_6 = Goal("≥ 0.6×", lambda ratio: ratio >= 0.6)
AT_LEAST_0_7 = Goal("≥ 0.7×", lambda ratio: ratio >= 0.7)
LINEAR = Goal("linear: ≤ 2.5 (2 is linear, 4 quadratic)", lambda ratio: ratio <= 2.5)
AT_MOST_15_MIN = Goal("≤ 15 min", lambda minutes: minutes <= 15.0)
AT_LEAST_0_99 = Goal("≥ 0.99", lambda share: share >= 0.99)


def spread(values: list[float], unit: str = "") -> str:
    """"0.47–0.51×": the range of the values (one value when they agree)."""
    suffix = unit if unit in ("", "×") else f" {unit}"
    low, high = min(values), max(values)
    return f"{low:.3g}{suffix}" if low == high else f"{low:.3g}–{high:.3g}{suffix}"


@dataclass
class Figure:
    name: str
    command: str
    unit: str
    goal: Goal | None = None
    values: list[float] = field(default_factory=list)  # one per run that measured it, in the order given
    context: dict[str, tuple[str, list[float]]] = field(default_factory=dict)  # what the same runs measured beside it

    @property
    def runs_meeting_goal(self) -> int | None:
        return None if self.goal is None else sum(self.goal.met(value) for value in self.values)

    def status(self) -> str:
        met, runs = self.runs_meeting_goal, len(self.values)
        if met is None:
            return ""
        if met == runs:
            return "met" if runs == 1 else f"met in all {runs} runs"
        return "**missed**" if met == 0 else f"met in {met} of {runs} runs"

    def measured(self) -> str:
        runs = "1 run" if len(self.values) == 1 else f"{len(self.values)} runs: " + ", ".join(f"{v:.3g}" for v in self.values)
        beside = "".join(f"; {name} {spread(values, unit)}" for name, (unit, values) in self.context.items())
        return f"{spread(self.values, self.unit)} ({runs}){beside}"

    def summary(self) -> dict:
        return {"figure": self.name, "command": self.command, "unit": self.unit, "values": self.values,
                "goal": self.goal.text if self.goal else None, "runs_meeting_goal": self.runs_meeting_goal,
                "context": {name: {"unit": unit, "values": values} for name, (unit, values) in self.context.items()}}  # fmt: skip


@dataclass
class Report:
    figures: dict[str, Figure] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)  # the 1-minute load averages the runs recorded
    cores: set[int] = field(default_factory=set)

    def add(self, name: str, command: str, unit: str, value: float, goal: Goal | None = None,
            context: dict[str, tuple[str, float]] | None = None) -> None:  # fmt: skip
        """One run's value of a figure, with what it measured beside it: name -> (unit, value)."""
        figure = self.figures.setdefault(name, Figure(name, command, unit, goal))
        figure.values.append(round(value, 4))
        for label, (label_unit, label_value) in (context or {}).items():
            figure.context.setdefault(label, (label_unit, []))[1].append(round(label_value, 4))

    def load(self, *loadavgs: list[float] | None) -> None:
        self.loads += [loadavg[0] for loadavg in loadavgs if loadavg]

    def markdown(self) -> str:
        lines = ["| figure | command | goal | measured | |", "|---|---|---|---|---|"]
        for figure in sorted(self.figures.values(), key=lambda f: COMMANDS.index(f.command) if f.command in COMMANDS else len(COMMANDS)):
            goal = figure.goal.text if figure.goal else ""
            lines.append(f"| {figure.name} | `{figure.command}` | {goal} | {figure.measured()} | {figure.status()} |")
        cores = "/".join(str(c) for c in sorted(self.cores)) or "unknown"
        load = spread(self.loads) if self.loads else "not recorded"
        return "\n".join([*lines, "", f"Cores: {cores}; the 1-minute load average the runs recorded: {load}."])


# ---- reading the outputs ------------------------------------------------------------------------------
def read_records(path: Path) -> list[dict]:
    """A JSON document, or JSON lines (lines that are not JSON objects, such as logs, are skipped)."""
    text = path.read_text()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    if isinstance(document, dict):
        return [document]
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def expert_actors(count: int) -> str:
    return f"{count} expert actor{'s' if count != 1 else ''}"


def is_dispatch(records: list[dict]) -> bool:
    return any(r.get("kind") == "context" for r in records) and any(r.get("kind") == "layer" for r in records)


def add_dispatch(report: Report, records: list[dict]) -> None:
    def rows(kind: str) -> list[dict]:
        return [r for r in records if r.get("kind") == kind]

    def ms(kind: str, figure: str = "median_us", **match) -> float | None:
        found = [r[figure] / 1e3 for r in rows(kind) if all(r[key] == value for key, value in match.items()) and figure in r]
        return found[0] if found else None

    context = rows("context")[0]
    unpinned = any(r.get("pin_cores") is False for r in rows("config"))  # a run for comparison: its own figures
    command, pinning = (DISPATCH_UNPINNED, ", cores not pinned") if unpinned else (DISPATCH, "")
    report.cores.add(context["cores"])
    report.load(context.get("loadavg_start"), *(r.get("loadavg_end") for r in rows("done")))
    labels = {"objectstore": f"object store{pinning}", "socket": f"socket{pinning}", "compiled": f"compiled graph{pinning}"}
    for actors, transport, goal in ((2, "objectstore", AT_MOST_2_5_MS), (2, "socket", None), (1, "compiled", AT_MOST_1_MS)):
        label = labels[transport]
        layer = {"kind": "layer", "actors": actors, "transport_alive": transport, "batch": 1}
        remote, local = ms(**layer, backend=transport), ms(**layer, backend="local")
        beside = {"Ray's floor": ms("floor", actors=actors, transport=transport, batch=1),
                  "the experts in process": local,
                  "the busiest expert actor's own time (mean)": ms(**layer, figure="expert_busy_us_mean", backend=transport)}  # fmt: skip
        if remote is not None and local is not None:
            report.add(f"MoE layer, batch 1, above one process: {label}, {expert_actors(actors)}", command, "ms",
                       remote - local, goal, {name: ("ms", value) for name, value in beside.items() if value is not None})  # fmt: skip
    decode = [r for r in rows("decode") if r["actors"] == 2 and r["batch"] == 8]
    best_one_process = max((r["tok_s"] for r in decode if r["backend"].startswith("one_process")), default=None)
    for transport in ("socket", "compiled", "objectstore"):
        label = labels[transport]
        for r in decode:
            if r["backend"] == transport and best_one_process:
                beside = {"a token": r["step_ms"], "the first generate after the setup, a token": r.get("first_step_ms")}
                report.add(f"decode, batch 8, 2 expert actors, ÷ the best one-process run: {label}", command, "×",
                           r["tok_s"] / best_one_process, AT_LEAST_0_6,
                           {name: ("ms", value) for name, value in beside.items() if value is not None})  # fmt: skip
    for r in rows("idle"):
        report.add(f"an idle {labels['compiled']}, {expert_actors(r['actors'])}: cores per actor while it stands", command,
                   "cores", statistics.mean(r["held_cores_per_actor"]),
                   context={"once released": ("cores", statistics.mean(r["released_cores_per_actor"])),
                            "released after its last use": ("s", r["released_after_s"])})  # fmt: skip


def is_train(records: list[dict]) -> bool:
    return any("ratio_graph_vs_one_process" in r for r in records)


def add_train(report: Report, records: list[dict]) -> None:
    graphs = [r for r in records if r.get("mode") == "actor_graph"]
    result = next(r for r in records if "ratio_graph_vs_one_process" in r)
    if "ratio_vs_one_process" in graphs[0]:  # a phase per router thread count, each with its one-process runs
        graph = max(graphs, key=lambda r: r["ratio_vs_one_process"])
        one_process_step_s = graph["one_process_step_s"]
    else:  # older outputs: one graph beside the one-process runs
        graph = graphs[0]
        one_process_step_s = max((r for r in records if r.get("mode") == "one_process"), key=lambda r: r["tokens_per_s"])["step_s"]
    report.cores.add(result["cores"])
    report.load(result.get("load_average"))
    routers = f"{graph['routers']} router{'s' if graph['routers'] != 1 else ''}"
    goal = AT_LEAST_0_7 if (graph["routers"], graph["expert_actors"]) == (1, 2) else None
    phases = graph.get("phase_ms", {})
    beside = {"graph step": ("ms", 1e3 * graph["step_s"]), "one process": ("ms", 1e3 * one_process_step_s),
              "the graph's waiting for its experts": ("ms", phases.get("expert_wait")),
              "the busiest expert actor's own time": ("ms", phases.get("expert_busy"))}  # fmt: skip
    if len(graphs) > 1:  # the bench's own choice of router threads: each phase's ratio beside the best
        beside |= {f"the router on {threads(r)}": ("×", r["ratio_vs_one_process"]) for r in graphs}
    # Runs for comparison get figures of their own, with the command that repeats them. Outputs from before
    # the socket transport (no "transport") ran on the object store, and with the router's threads as set.
    settings = [(TRAIN_OBJECTSTORE, ", object store")] if graph.get("transport", "objectstore") == "objectstore" else []
    settings += [(TRAIN_UNPINNED, ", cores not pinned")] if graph.get("pin_cores") is False else []
    if len(graphs) == 1 and graph.get("router_cpu_threads") not in (None, 1):
        settings.append((f"{TRAIN} --set router_cpu_threads={graph['router_cpu_threads']}", f", the router on {threads(graph)}"))
    command = TRAIN + "".join(setting.removeprefix(TRAIN) for setting, _ in settings)
    label = "".join(text for _, text in settings)
    report.add(f"training tokens/s, {routers} + {expert_actors(graph['expert_actors'])}{label} ÷ the best one-process run",
               command, "×", result["ratio_graph_vs_one_process"], goal,
               {name: value for name, value in beside.items() if value[1] is not None})  # fmt: skip


def threads(graph: dict) -> str:
    count = graph.get("router_cpu_threads") or 1
    return f"{count} thread{'s' if count != 1 else ''}"


def is_sft(records: list[dict]) -> bool:
    return len(records) == 1 and "train_seconds" in records[0] and "heldout_exact_match" in records[0]


def add_sft(report: Report, records: list[dict]) -> None:
    result = records[0]
    report.load(result.get("loadavg"))
    wall = result.get("wall_seconds")
    name = "wall" if wall is not None else "the steps' time (a result.json without wall_seconds)"
    report.add(f"SFT stage 1 of the bundled model ({result['steps']} steps): {name}", SFT, "min",
               (wall if wall is not None else result["train_seconds"]) / 60, AT_MOST_15_MIN)  # fmt: skip
    report.add("SFT stage 1 of the bundled model: held-out exact match", SFT, "", result["heldout_exact_match"], AT_LEAST_0_99)


def is_long_prompt(records: list[dict]) -> bool:
    return any("peak_ratio" in r for r in records)


def add_long_prompt(report: Report, records: list[dict]) -> None:
    machine = next(r["machine"] for r in records if "machine" in r)
    report.cores.add(machine["cores"])
    report.load(machine.get("loadavg"), *(r["machine_after"].get("loadavg") for r in records if "machine_after" in r))
    ratios = {r["path"]: r["peak_ratio"] for r in records if "peak_ratio" in r}
    report.add("peak memory of a prompt, 32K ÷ 16K tokens, the worst prefill path", LONG_PROMPT, "×",
               max(ratios.values()), LINEAR, {path: ("×", ratio) for path, ratio in ratios.items()})  # fmt: skip


READERS: list[tuple[str, Callable[[list[dict]], bool], Callable[[Report, list[dict]], None]]] = [
    ("bench.dispatch", is_dispatch, add_dispatch),
    ("bench.train", is_train, add_train),
    ("jobs.sft", is_sft, add_sft),
    ("bench.long_prompt", is_long_prompt, add_long_prompt),
]


def add_run(report: Report, path: Path) -> str:
    """The figures of one output file into the report; returns which command wrote it."""
    records = read_records(path)
    for name, recognises, read in READERS:
        if records and recognises(records):
            try:
                read(report, records)
            except (KeyError, StopIteration, TypeError) as error:
                raise NotABenchOutput(f"{path} is an incomplete {name} output (no {error})") from None
            return name
    raise NotABenchOutput(f"{path} is not the output of bench.dispatch, bench.train, bench.long_prompt or a jobs.sft result.json")


def build(paths: Iterable[Path]) -> Report:
    report = Report()
    for path in paths:
        add_run(report, path)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("outputs", nargs="+", type=Path, help="bench JSON-lines outputs and jobs.sft result.json files")
    parser.add_argument("--json", action="store_true", help="the figures as JSON lines instead of a Markdown table")
    args = parser.parse_args(argv)
    try:
        report = build(args.outputs)
    except (OSError, NotABenchOutput) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    if args.json:
        for figure in report.figures.values():
            print(json.dumps(figure.summary()))
    else:
        print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
