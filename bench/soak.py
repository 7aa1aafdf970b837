"""Soak: `concurrency` clients send requests back to back to a real `moeray serve` on loopback for a
bounded time; resident memory of every process it started is read at the start, after warm-up and
at the end (all of it, and the private part: the pages of Ray's shared-memory object store count as
resident in its raylet as the store fills, which is no leak).

    python -m bench.soak                        # 10 minutes, concurrency 32, 1 minute of warm-up
    python -m bench.soak --duration-s 120 --warmup-s 30

The requests mix streamed and whole chat completions and completions, a quarter of them continuing
one of 64 sessions. Prints requests, errors (by kind), p50/p99 latency and the RSS figures as JSON;
the targets are 0 errors and under 5% RSS growth from the end of the warm-up to the end.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
from collections import Counter

import requests

from bench.args import non_negative_float, positive_float, positive_int

from .served import memory_by_process, moeray_serve

REQUEST_TIMEOUT_S = 120


def one_request(base_url: str, key: str, model: str, rng: random.Random) -> str:
    """One request of the mix; "ok" or what went wrong."""
    a, b = rng.randint(1, 99), rng.randint(1, 99)
    stream = rng.random() < 0.5
    body = {"model": model, "max_tokens": 16, "temperature": 0.7, "seed": rng.randint(0, 2**31), "stream": stream}
    if rng.random() < 0.5:
        path, body["messages"] = "/v1/chat/completions", [{"role": "user", "content": f"What is {a} plus {b}?"}]
    else:
        path, body["prompt"] = "/v1/completions", f"Compute {a} minus {b}"
    if rng.random() < 0.25:
        body["session_id"] = f"soak-{rng.randrange(64)}"
    try:
        response = requests.post(base_url + path, json=body, headers={"Authorization": f"Bearer {key}"},
                                 timeout=REQUEST_TIMEOUT_S, stream=stream)
        with response:
            if response.status_code != 200:
                return f"http_{response.status_code}"
            if not stream:
                return "ok" if response.json()["choices"] else "empty_answer"
            lines = [line for line in response.iter_lines(decode_unicode=True) if line]
    except requests.Timeout:
        return "timeout"
    except requests.RequestException as error:
        return type(error).__name__
    if lines[-1:] != ["data: [DONE]"]:
        return "stream_not_done"
    return "stream_error" if any(line.startswith('data: {"error"') for line in lines) else "ok"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def soak(base_url: str, key: str, model: str, server_pid: int, concurrency: int, duration_s: float,
         warmup_s: float) -> dict:
    started = time.monotonic()
    memory_start = memory_by_process(server_pid)
    warm_until, stop_at = started + warmup_s, started + warmup_s + duration_s
    results: list[tuple[float, float, str]] = []  # (finished at, latency, outcome)
    lock = threading.Lock()

    def client(index: int) -> None:
        rng = random.Random(index)
        while time.monotonic() < stop_at:
            t0 = time.monotonic()
            outcome = one_request(base_url, key, model, rng)
            with lock:
                results.append((time.monotonic(), time.monotonic() - t0, outcome))

    clients = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in clients:
        thread.start()
    time.sleep(max(0.0, warm_until - time.monotonic()))  # the bench measures time: waiting is the point
    memory_warm = memory_by_process(server_pid)
    for thread in clients:
        thread.join(timeout=stop_at - time.monotonic() + REQUEST_TIMEOUT_S + 30)
    memory_end = memory_by_process(server_pid)
    measured = [(latency, outcome) for at, latency, outcome in results if at >= warm_until]
    latencies = [latency for latency, outcome in measured if outcome == "ok"]
    errors = Counter(outcome for _, _, outcome in results if outcome != "ok")
    return {
        "concurrency": concurrency, "duration_s": duration_s, "warmup_s": warmup_s,
        "requests": len(results), "requests_after_warmup": len(measured), "errors": sum(errors.values()),
        "errors_by_kind": dict(errors), "clients_still_running": sum(t.is_alive() for t in clients),
        "requests_per_s": round(len(measured) / duration_s, 2),
        "latency_p50_s": round(percentile(latencies, 0.50) or 0, 3),
        "latency_p99_s": round(percentile(latencies, 0.99) or 0, 3),
        **memory_figures(memory_start, memory_warm, memory_end),
    }


def memory_figures(start: dict[int, dict], warm: dict[int, dict], end: dict[int, dict]) -> dict:
    """Totals at the three moments, the growth from warm-up to the end (resident, and private only),
    and per process (pid name) its private MiB after warm-up and at the end."""
    def total(memory: dict[int, dict], kind: str) -> float:
        return sum(p[kind] for p in memory.values()) / 2**20

    figures = {f"{kind}_{moment}_mib": round(total(memory, kind), 1) for kind in ("rss", "anon")
               for moment, memory in (("start", start), ("after_warmup", warm), ("end", end))}
    for kind in ("rss", "anon"):
        figures[f"{kind}_growth_after_warmup_pct"] = round(100 * (total(end, kind) / total(warm, kind) - 1), 2)
    figures["anon_by_process_mib"] = {
        f"{pid} {p['name']}": [round(warm.get(pid, {"anon": 0})["anon"] / 2**20, 1), round(p["anon"] / 2**20, 1)]
        for pid, p in sorted(end.items())
    }
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=positive_float, default=600, help="measured time after the warm-up")
    parser.add_argument("--warmup-s", type=non_negative_float, default=60)
    parser.add_argument("--concurrency", type=positive_int, default=32)
    args = parser.parse_args(argv)
    with moeray_serve() as served:
        report = soak(served.base_url, served.keys[0], served.model, served.process.pid, args.concurrency,
                      args.duration_s, args.warmup_s)
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
