"""Soak: `concurrency` clients send requests back to back to a real `moeray serve` on loopback for a
bounded time; resident memory of every process it started is read at the start, after warm-up and
at the end.

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

from .served import moeray_serve, rss_by_process

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
    rss_start = rss_by_process(server_pid)
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
    rss_warm = rss_by_process(server_pid)
    for thread in clients:
        thread.join(timeout=stop_at - time.monotonic() + REQUEST_TIMEOUT_S + 30)
    rss_end = rss_by_process(server_pid)
    measured = [(latency, outcome) for at, latency, outcome in results if at >= warm_until]
    latencies = [latency for latency, outcome in measured if outcome == "ok"]
    errors = Counter(outcome for _, _, outcome in results if outcome != "ok")
    warm_total, end_total = sum(rss_warm.values()), sum(rss_end.values())
    return {
        "concurrency": concurrency, "duration_s": duration_s, "warmup_s": warmup_s,
        "requests": len(results), "requests_after_warmup": len(measured), "errors": sum(errors.values()),
        "errors_by_kind": dict(errors), "clients_still_running": sum(t.is_alive() for t in clients),
        "requests_per_s": round(len(measured) / duration_s, 2),
        "latency_p50_s": round(percentile(latencies, 0.50) or 0, 3),
        "latency_p99_s": round(percentile(latencies, 0.99) or 0, 3),
        "rss_start_mib": round(sum(rss_start.values()) / 2**20, 1),
        "rss_after_warmup_mib": round(warm_total / 2**20, 1), "rss_end_mib": round(end_total / 2**20, 1),
        "rss_growth_after_warmup_pct": round(100 * (end_total - warm_total) / warm_total, 2),
        "rss_by_process_mib": {name: [round(rss_warm.get(name, 0) / 2**20, 1), round(rss / 2**20, 1)]
                               for name, rss in sorted(rss_end.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration-s", type=float, default=600, help="measured time after the warm-up")
    parser.add_argument("--warmup-s", type=float, default=60)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args(argv)
    with moeray_serve() as served:
        report = soak(served.base_url, served.keys[0], served.model, served.process.pid, args.concurrency,
                      args.duration_s, args.warmup_s)
    print(json.dumps(report))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
