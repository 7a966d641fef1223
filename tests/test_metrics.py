"""Instance metrics reach Ray's Prometheus endpoint (scraped over HTTP, as Prometheus would)."""

import socket
import time
import urllib.request

import pytest

ray = pytest.importorskip("ray")
import fabric  # noqa: E402

NAMES = ["kv_fabric_blocks_used", "kv_fabric_blocks_free", "kv_fabric_blocks_lent",
         "kv_fabric_blocks_borrowed", "kv_fabric_borrow_events", "kv_fabric_queue_length",
         "kv_fabric_tokens_per_second", "kv_fabric_ttft_seconds", "kv_fabric_tpot_seconds"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def test_metrics_are_exported():
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, _metrics_export_port=port,
             log_to_driver=False)
    try:
        with fabric.start({"instances": {"count": 2, "kv_blocks": 8, "block_size": 8}}) as fab:
            fab.generate([list(range(1, 100))], max_new_tokens=6, ignore_eos=True)  # borrows
            deadline, body = time.time() + 60, ""
            while time.time() < deadline:
                body = scrape(port)
                if all(n in body for n in NAMES) and "kv_fabric_borrow_events_total" in body:
                    break
                time.sleep(1)
        lines = [ln for ln in body.splitlines() if ln.startswith("ray_kv_fabric")]
        for name in NAMES:
            assert any(name in ln for ln in lines), f"{name} was not exported"
        ttft = [ln for ln in lines if ln.startswith("ray_kv_fabric_ttft_seconds_count")]
        assert sum(float(ln.rsplit(" ", 1)[1]) for ln in ttft) >= 1
    finally:
        ray.shutdown()
