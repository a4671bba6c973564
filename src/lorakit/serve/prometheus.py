"""`/metrics` in the Prometheus text format, written by `prometheus_client`.

HTTP requests are counted by route template (`/v1/adapters/{name}`, not the name a
client sent) and status; a path that matches no route counts as "unmatched". The label
set is therefore bounded by the routes, and the client library escapes every value.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from lorakit.serve.engine import Engine

UNMATCHED = "unmatched"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """HTTP counters kept by the app, and the engine's and adapter cache's counters read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.http: dict[tuple[str, int], int] = {}
        self.rejected = 0
        self._lock = threading.Lock()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def count_http(self, route: str | None, status: int) -> None:
        key = (route or UNMATCHED, int(status))
        with self._lock:
            self.http[key] = self.http.get(key, 0) + 1

    def count_rejected(self) -> None:
        with self._lock:
            self.rejected += 1

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        stats, cache, engine = self.engine.stats, self.engine.adapters, self.engine
        requests = CounterMetricFamily("lorakit_requests", "Finished generation requests by finish reason.", labels=["finish_reason"])
        for reason, value in sorted({"stop": 0, **stats.requests}.items()):
            requests.add_metric([reason], value)
        yield requests
        http = CounterMetricFamily("lorakit_http_requests", "HTTP requests by route and status.", labels=["path", "status"])
        with self._lock:
            counts = sorted(self.http.items())
            rejected = self.rejected
        for (route, status), value in counts:
            http.add_metric([route, str(status)], value)
        yield http
        counters = [
            ("rejected_requests", "Requests refused because the queue was full.", rejected),
            ("prompt_tokens", "Prompt tokens prefilled.", stats.prompt_tokens),
            ("generation_tokens", "Tokens generated.", stats.generated_tokens),
            ("decode_steps", "Decode steps run.", stats.decode_steps),
            ("decode_rows", "Sum of batch sizes over decode steps (divide by steps for the mean).", stats.batch_rows),
            ("adapter_cache_hits", "Requests whose adapter was on the device.", cache.hits),
            ("adapter_cache_misses", "Requests whose adapter had to be loaded.", cache.misses),
            ("adapter_cache_evictions", "Adapters moved off the device.", cache.evictions),
        ]
        for name, help_text, value in counters:
            yield CounterMetricFamily(f"lorakit_{name}", help_text, value=value)
        gauges = [
            ("queue_depth", "Requests waiting to join the batch.", engine.queue_depth),
            ("batch_size", "Requests in the running batch.", engine.running),
            ("adapters_on_device", "Adapters resident on the compute device.", len(cache.on_device)),
            ("adapters_loaded", "Adapters this server knows.", len(cache.paths)),
        ]
        for name, help_text, value in gauges:
            yield GaugeMetricFamily(f"lorakit_{name}", help_text, value=value)
