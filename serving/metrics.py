"""Serving metrics through `ray.util.metrics`, exported by every node's Prometheus endpoint (names get
Ray's `ray_` prefix): requests, tokens in and out, time to first token, time per output token, queue
depth, latent-cache blocks and hit rate, and per-layer expert imbalance."""

from __future__ import annotations

from ray.util.metrics import Counter, Gauge, Histogram

_LATENCY_S = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
_PER_TOKEN_S = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]


class IngressMetrics:
    """Recorded by the HTTP/gRPC ingress replicas."""

    def __init__(self, model: str):
        self.tags = {"model": model}
        self.requests = Counter(
            "moeray_requests", "API requests by endpoint and status code", tag_keys=("model", "endpoint", "status")
        )
        self.requests.set_default_tags(self.tags)

    def request(self, endpoint: str, status: int | str) -> None:
        self.requests.inc(1, {"endpoint": endpoint, "status": str(status)})


class EngineMetrics:
    """Recorded by the engine replica (one place for HTTP and gRPC traffic)."""

    def __init__(self, model: str):
        self.tags = {"model": model}
        keys = ("model",)
        self.prompt_tokens = Counter("moeray_prompt_tokens", "prompt tokens received", tag_keys=keys)
        self.cached_tokens = Counter("moeray_cached_prompt_tokens", "prompt tokens served from the latent cache", tag_keys=keys)
        self.completion_tokens = Counter("moeray_completion_tokens", "tokens generated", tag_keys=keys)
        self.finished = Counter("moeray_engine_requests", "engine requests by outcome", tag_keys=("model", "outcome"))
        self.ttft = Histogram("moeray_time_to_first_token_seconds", "time to first token", _LATENCY_S, tag_keys=keys)
        self.tpot = Histogram("moeray_time_per_output_token_seconds", "time per output token after the first",
                              _PER_TOKEN_S, tag_keys=keys)
        self.queue_depth = Gauge("moeray_queue_depth", "sequences waiting for admission", tag_keys=keys)
        self.running = Gauge("moeray_running", "sequences running", tag_keys=keys)
        self.streams = Gauge("moeray_open_streams", "requests being streamed", tag_keys=keys)
        self.blocks_used = Gauge("moeray_cache_blocks_used", "latent-cache blocks in use", tag_keys=("model", "router"))
        self.blocks_free = Gauge("moeray_cache_blocks_free", "latent-cache blocks free", tag_keys=("model", "router"))
        self.hit_rate = Gauge("moeray_cache_hit_rate", "prompt tokens served from the cache / prompt tokens", tag_keys=keys)
        self.imbalance = Gauge("moeray_expert_imbalance", "max/mean tokens per expert actor", tag_keys=("model", "layer"))
        for metric in (self.prompt_tokens, self.cached_tokens, self.completion_tokens, self.finished, self.ttft,
                       self.tpot, self.queue_depth, self.running, self.streams, self.blocks_used, self.blocks_free,
                       self.hit_rate, self.imbalance):
            metric.set_default_tags(self.tags)

    def publish(self, stats: dict, open_streams: int) -> None:
        """Gauges from Engine.stats()."""
        self.queue_depth.set(stats.get("queue_depth", 0))
        self.running.set(stats.get("running", 0))
        self.streams.set(open_streams)
        cache = stats.get("cache") or {}
        for index, router in enumerate(cache.get("routers", [])):
            self.blocks_used.set(router.get("blocks_used", 0), {"router": str(index)})
            self.blocks_free.set(router.get("blocks_free", 0), {"router": str(index)})
        if "hit_rate" in cache:
            self.hit_rate.set(cache["hit_rate"])
        for layer, load in ((stats.get("experts") or {}).get("layers") or {}).items():
            self.imbalance.set(load.get("imbalance", 0.0), {"layer": str(layer)})
