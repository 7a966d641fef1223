"""The serving ingress's `/metrics`: Prometheus text format (version 0.0.4), vLLM-style names
under a `kvfabric:` prefix. Counters and latency histograms are kept by the ingress per request;
the gauges come from `Fabric.stats()` (the ingress caches it about a second). No Ray here."""

from __future__ import annotations

import threading

PREFIX = "kvfabric:"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
               2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
               40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

# name (without prefix) -> (type, help); the order of /metrics
METRICS = {
    "http_requests_total": ("counter", "HTTP requests answered, by route, method and status"),
    "request_success_total": ("counter", "generation requests finished, by finish reason"),
    "prompt_tokens_total": ("counter", "prompt tokens of finished generation requests"),
    "generation_tokens_total": ("counter", "tokens generated for finished requests"),
    "time_to_first_token_seconds": ("histogram", "from the request's arrival at the ingress to "
                                                 "its first generated token"),
    "inter_token_latency_seconds": ("histogram", "between two generated tokens of a request"),
    "e2e_request_latency_seconds": ("histogram", "from arrival to the last token"),
    "num_requests_running": ("gauge", "requests in a running batch of an instance"),
    "num_requests_waiting": ("gauge", "requests waiting in an instance's queue"),
    "num_requests_in_flight": ("gauge", "generation requests the ingress is answering now"),
    "kv_cache_usage_perc": ("gauge", "share of the fabric's KV blocks not free (0..1)"),
    "kv_blocks_total": ("gauge", "KV blocks of all instances"),
    "kv_blocks_free": ("gauge", "free KV blocks of all instances"),
    "kv_blocks_lent": ("gauge", "KV blocks lent to other instances"),
    "kv_blocks_borrowed": ("gauge", "KV blocks borrowed from other instances"),
    "borrow_events_total": ("counter", "times an instance borrowed KV blocks"),
    "prefix_cache_queries_total": ("counter", "prompt tokens looked up in the prefix cache "
                                              "(first admissions; a recompute is not a query)"),
    "prefix_cache_hits_total": ("counter", "prompt tokens served from a prefix cache"),
    "prompt_tokens_cached_total": ("counter", "prompt tokens of finished requests served from a "
                                              "prefix cache"),
    "kv_blocks_cached": ("gauge", "KV blocks holding cached prefixes (in use or evictable)"),
    "kv_tier_blocks": ("gauge", "KV blocks held by the nodes' tiers below the pools, by tier"),
    "kv_tier_bytes": ("gauge", "bytes held by the nodes' tiers below the pools, by tier"),
    "kv_tier_hits_total": ("counter", "KV blocks read back from a tier below the pools, by tier"),
    "kv_tier_bytes_up_total": ("counter", "bytes brought up from a tier into a pool, by tier"),
    "kv_tier_bytes_down_total": ("counter", "bytes written down into a tier, by tier"),
    "kv_tier_loaded_tokens_total": ("counter", "prompt tokens whose KV came up from a tier"),
    "kv_tier_computed_tokens_total": ("counter", "prompt tokens held below but computed "
                                                 "(compute-or-load's share of compute)"),
    "session_evictions_total": ("counter", "blocks of sessions within their time-to-live "
                                           "evicted under memory pressure"),
    "num_instances": ("gauge", "live instances (replicas) of the fabric"),
    "stats_up": ("gauge", "1 when the last Fabric.stats() for the gauges succeeded"),
}


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Histogram:
    __slots__ = ("buckets", "counts", "sum", "count")

    def __init__(self, buckets: tuple):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
        self.sum += v
        self.count += 1

    def lines(self, name: str, labels: dict) -> list[str]:
        out = [f"{name}_bucket{_labels({**labels, 'le': _num(b)})} {c}"
               for b, c in zip(self.buckets, self.counts)]
        out.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {self.count}")
        out.append(f"{name}_sum{_labels(labels)} {_num(float(self.sum))}")
        out.append(f"{name}_count{_labels(labels)} {self.count}")
        return out


class ServingMetrics:
    """Thread-safe: the ingress records from its event loop and its worker threads."""

    def __init__(self, model_name: str):
        self.base = {"model_name": model_name}
        self._lock = threading.Lock()
        self.http: dict[tuple, int] = {}                 # (route, method, status) -> count
        self.finished: dict[str, int] = {}               # finish reason -> count
        self.prompt_tokens = self.generation_tokens = self.cached_tokens = 0
        self.in_flight = 0
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.itl = _Histogram(ITL_BUCKETS)
        self.e2e = _Histogram(E2E_BUCKETS)

    def http_request(self, route: str, method: str, status: int) -> None:
        with self._lock:
            key = (route, method, str(status))
            self.http[key] = self.http.get(key, 0) + 1

    def started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def ended(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def inter_token(self, seconds: float) -> None:
        with self._lock:
            self.itl.observe(seconds)

    def request_cancelled(self) -> None:
        """A request whose client went away before its answer was complete."""
        with self._lock:
            self.finished["cancelled"] = self.finished.get("cancelled", 0) + 1

    def request_finished(self, reason: str, prompt_tokens: int, generated: int,
                         seconds: float, cached_tokens: int = 0) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
            self.generation_tokens += generated
            self.e2e.observe(seconds)

    def render(self, stats: dict | None) -> str:
        """The whole /metrics page; `stats`: the last `Fabric.stats()`, None if it failed."""
        with self._lock:
            samples = self._samples(stats)
        out = []
        for name, (kind, text) in METRICS.items():
            lines = samples.get(name)
            if lines is None:
                continue
            full = PREFIX + name
            out.append(f"# HELP {full} {text}")
            out.append(f"# TYPE {full} {kind}")
            out += [line if line.startswith(full) else full + line for line in lines]
        return "\n".join(out) + "\n"

    def _samples(self, stats: dict | None) -> dict[str, list[str]]:
        b = self.base
        s: dict[str, list[str]] = {
            "http_requests_total": [
                f"{_labels({**b, 'route': r, 'method': m, 'status': st})} {n}"
                for (r, m, st), n in sorted(self.http.items())],
            "request_success_total": [
                f"{_labels({**b, 'finished_reason': reason})} {n}"
                for reason, n in sorted(self.finished.items())],
            "prompt_tokens_total": [f"{_labels(b)} {self.prompt_tokens}"],
            "prompt_tokens_cached_total": [f"{_labels(b)} {self.cached_tokens}"],
            "generation_tokens_total": [f"{_labels(b)} {self.generation_tokens}"],
            "num_requests_in_flight": [f"{_labels(b)} {self.in_flight}"],
            "stats_up": [f"{_labels(b)} {0 if stats is None else 1}"],
        }
        for name, h in (("time_to_first_token_seconds", self.ttft),
                        ("inter_token_latency_seconds", self.itl),
                        ("e2e_request_latency_seconds", self.e2e)):
            s[name] = h.lines(PREFIX + name, b)
        if stats is not None:
            for name, value in gauges(stats).items():
                s[name] = [f"{_labels(b)} {_num(value)}"]
            for name, samples in tier_samples(stats).items():
                s[name] = [f"{_labels({**b, **labels})} {_num(v)}" for labels, v in samples]
        return s


def tier_samples(stats: dict) -> dict[str, list[tuple[dict, float]]]:
    """The KV-tier samples of one `Fabric.stats()` (per tier where labelled)."""
    t = stats.get("tiers") or {}
    out: dict[str, list[tuple[dict, float]]] = {}
    for name, key in (("kv_tier_blocks", "blocks"), ("kv_tier_bytes", "bytes"),
                      ("kv_tier_hits_total", "hits"), ("kv_tier_bytes_up_total", "bytes_up"),
                      ("kv_tier_bytes_down_total", "bytes_down")):
        out[name] = [({"tier": tier}, t[tier].get(key, 0)) for tier in ("host", "disk")
                     if t.get(tier)]
    out["kv_tier_loaded_tokens_total"] = [({}, t.get("loaded_tokens", 0))]
    out["kv_tier_computed_tokens_total"] = [({}, t.get("computed_tokens", 0))]
    out["session_evictions_total"] = [
        ({}, (stats.get("prefix_cache") or {}).get("session_evictions_under_pressure", 0))]
    return out


def gauges(stats: dict) -> dict[str, float]:
    """The fabric-wide gauges of one `Fabric.stats()`."""
    inst = stats.get("instances", [])
    total = sum(i["blocks_total"] for i in inst)
    free = sum(i["blocks_free"] for i in inst)
    return {
        "num_requests_running": sum(i.get("detail", {}).get("num_running", 0) for i in inst),
        "num_requests_waiting": sum(i.get("detail", {}).get("num_waiting", 0) for i in inst),
        "kv_cache_usage_perc": (total - free) / total if total else 0.0,
        "kv_blocks_total": total,
        "kv_blocks_free": free,
        "kv_blocks_lent": sum(i["blocks_lent"] for i in inst),
        "kv_blocks_borrowed": sum(i["blocks_borrowed"] for i in inst),
        "borrow_events_total": stats.get("lending", {}).get("borrow_events", 0),
        "prefix_cache_queries_total": stats.get("prefix_cache", {}).get("queries", 0),
        "prefix_cache_hits_total": stats.get("prefix_cache", {}).get("hits", 0),
        "kv_blocks_cached": stats.get("prefix_cache", {}).get("blocks_cached", 0),
        "num_instances": len(inst),
    }
