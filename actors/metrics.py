"""Prometheus metrics of an instance, through `ray.util.metrics` (exported by Ray's metrics
endpoint on each node). Gauges are refreshed with the heartbeat, histograms per request."""

from __future__ import annotations

from ray.util import metrics

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]


class InstanceMetrics:
    def __init__(self, instance_id: int, fabric_name: str):
        tags = ("fabric", "instance")
        self.tags = {"fabric": fabric_name, "instance": str(instance_id)}
        self.blocks = {kind: metrics.Gauge(f"kv_fabric_blocks_{kind}",
                                           description=f"KV blocks {kind} on this instance",
                                           tag_keys=tags)
                       for kind in ("used", "free", "lent", "borrowed")}
        self.queue = metrics.Gauge("kv_fabric_queue_length", description="requests waiting",
                                   tag_keys=tags)
        self.running = metrics.Gauge("kv_fabric_running_requests", description="requests running",
                                     tag_keys=tags)
        self.tokens_per_s = metrics.Gauge("kv_fabric_tokens_per_second",
                                          description="generated tokens per second (last interval)",
                                          tag_keys=tags)
        self.borrow_events = metrics.Counter("kv_fabric_borrow_events",
                                             description="times this instance borrowed KV blocks",
                                             tag_keys=tags)
        self.tokens = metrics.Counter("kv_fabric_generated_tokens", description="tokens generated",
                                      tag_keys=tags)
        self.prefix = {kind: metrics.Counter(f"kv_fabric_prefix_cache_{kind}",
                                             description=f"prompt tokens: {text}", tag_keys=tags)
                       for kind, text in (("queries", "looked up in the prefix cache"),
                                          ("hits", "served from a prefix cache"))}
        self._last_prefix = {"queries": 0, "hits": 0}
        self.ttft = metrics.Histogram("kv_fabric_ttft_seconds", description="time to first token",
                                      boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.tpot = metrics.Histogram("kv_fabric_tpot_seconds", description="time per output token",
                                      boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self._last_tokens, self._last_borrows = 0, 0

    def refresh(self, *, total: int, free: int, lent: int, borrowed: int, waiting: int,
                running: int, generated: int, borrow_events: int, seconds: float,
                prefix: dict | None = None) -> None:
        t = self.tags
        for kind, value in (prefix or {}).items():
            if value > self._last_prefix[kind]:
                self.prefix[kind].inc(value - self._last_prefix[kind], tags=t)
                self._last_prefix[kind] = value
        for kind, value in (("used", total - free - lent), ("free", free), ("lent", lent),
                            ("borrowed", borrowed)):
            self.blocks[kind].set(value, tags=t)
        self.queue.set(waiting, tags=t)
        self.running.set(running, tags=t)
        new_tokens = generated - self._last_tokens
        self.tokens_per_s.set(new_tokens / seconds if seconds > 0 else 0.0, tags=t)
        if new_tokens:
            self.tokens.inc(new_tokens, tags=t)
        if borrow_events > self._last_borrows:
            self.borrow_events.inc(borrow_events - self._last_borrows, tags=t)
        self._last_tokens, self._last_borrows = generated, borrow_events

    def observe_request(self, ttft_s: float, tpot_s: float) -> None:
        self.ttft.observe(ttft_s, tags=self.tags)
        if tpot_s > 0:
            self.tpot.observe(tpot_s, tags=self.tags)
