"""Prometheus metrics of the REST server, under vLLM's names with a `tpserve:` prefix.

Counters and latency histograms are observed by the serving layer as tokens
stream out; the gauges (running, waiting, KV usage, prefix hit rate) and the
preemption and session-eviction counters are read from the engine's `stats()`
at scrape time. Each server owns its registry, so
several apps in one process (tests) never collide.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

PREFIX = "tpserve:"

disable_created_metrics()  # no `*_created` series beside each counter (as vLLM)

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
                0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                60.0, 120.0, 240.0, 480.0)

# engine stats key -> gauge name (without prefix)
_GAUGES = {
    "running": ("num_requests_running", "Requests currently being generated."),
    "waiting": ("num_requests_waiting", "Requests queued for a batch slot."),
    "kv_cache_usage": ("kv_cache_usage_perc", "Fraction of KV cache blocks in use (0..1)."),
    "prefix_cache_hit_rate": ("prefix_cache_hit_rate", "Fraction of prompt tokens served from the prefix cache."),
}

# engine stats key (a running total) -> counter name (without prefix and `_total`)
_TOTALS = {
    "num_preemptions": ("num_preemptions", "Requests preempted: KV blocks freed, recomputed later."),
    "num_session_evictions": ("num_session_evictions",
                              "Idle sessions whose KV blocks were given to other requests."),
}


class ServerMetrics:
    """The metric set of one served model."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        labels = ["model_name"]

        def counter(name: str, doc: str) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=self.registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry)

        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens processed.")
        self.generation_tokens = counter("generation_tokens", "Tokens generated.")
        self.requests_finished = Counter(PREFIX + "request_success", "Finished requests by reason.",
                                         labels + ["finished_reason"], registry=self.registry)
        self.ttft = histogram("time_to_first_token_seconds", "Time to first token.", _LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Time between streamed tokens.", _ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", _E2E_BUCKETS)
        self.gauges = {key: Gauge(PREFIX + name, doc, labels, registry=self.registry)
                       for key, (name, doc) in _GAUGES.items()}
        self.totals = {key: counter(name, doc) for key, (name, doc) in _TOTALS.items()}
        for total in self.totals.values():
            total.labels(model_name)  # shown from the first scrape, at 0
        self._totals_seen = dict.fromkeys(_TOTALS, 0)

    def observe_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def observe_tokens(self, num_tokens: int, seconds_since_last: float, first: bool) -> None:
        """`num_tokens` new tokens arrived `seconds_since_last` after the previous step."""
        if num_tokens <= 0:
            return
        self.generation_tokens.labels(self.model_name).inc(num_tokens)
        if first:
            self.ttft.labels(self.model_name).observe(seconds_since_last)
        else:
            self.itl.labels(self.model_name).observe(seconds_since_last / num_tokens)

    def observe_finished(self, reason: str, seconds: float) -> None:
        self.requests_finished.labels(self.model_name, reason).inc()
        self.e2e.labels(self.model_name).observe(seconds)

    def render(self, stats: dict) -> tuple[bytes, str]:
        """The exposition text and its content type, gauges refreshed from `stats`."""
        for key, gauge in self.gauges.items():
            value = stats.get(key)
            if key == "prefix_cache_hit_rate" and value is None:
                value = stats.get("prefix_hit_rate")
            if isinstance(value, (int, float)):
                gauge.labels(self.model_name).set(float(value))
        for key, total in self.totals.items():  # the engine's totals, as counter increments
            value = stats.get(key)
            if isinstance(value, int) and value > self._totals_seen[key]:
                total.labels(self.model_name).inc(value - self._totals_seen[key])
                self._totals_seen[key] = value
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
