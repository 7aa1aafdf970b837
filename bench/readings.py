"""What the benchmarks read off a graph's expert actors between their timed runs."""

from __future__ import annotations


def expert_readings(experts: list, key: str) -> list[float]:
    """One figure of every expert actor's `ready()`: cpu_s, busy_s."""
    import ray  # a bench sets RAY_AUTH_MODE before Ray is imported

    return [reply[key] for reply in ray.get([a.ready.remote() for a in experts])]
