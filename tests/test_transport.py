"""The data-plane transport between real Ray actors, for both backends ("torch" over gloo, "ray"):
bit-exact round trips, calls in both directions and all-to-all at once (no deadlock, replies
paired with their requests), errors, stats, and a round-trip micro-benchmark.

Run as a script for the benchmark table alone: `python tests/test_transport.py`.
"""

import os
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from actors.transport import (  # noqa: E402
    TransportError, TransportHost, close_group, connect_group, create_transport,
    transport_actor_options)

NUM_ACTORS = 3
BACKENDS = ["torch", "ray"]
CALL_TIMEOUT_S = 60            # a deadlock fails the test instead of hanging it
INLINE = 64 * 1024             # small frames here, so that the split path (header + body) runs too
DTYPES = [torch.float32, torch.bfloat16, torch.int32, torch.int64]


def random_tensor(shape, dtype, g: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(shape, generator=g).to(dtype)
    return torch.randint(-2**31, 2**31 - 1, shape, generator=g).to(dtype)


def expected_reply(src: int, dst: int, meta: dict, tensors: list) -> tuple[dict, list]:
    """What `Peer.serve_transport` answers to a "mix" request: depends on every input."""
    out = [t.flip(0) if t.dim() else t.clone() for t in tensors]
    checksum = sum(int(t.reshape(-1).view(torch.uint8).sum()) for t in tensors)
    return {"id": meta["id"], "src": src, "rank": dst, "checksum": checksum}, out


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))


@ray.remote(**transport_actor_options())
class Peer(TransportHost):
    def __init__(self, rank: int):
        self.rank = rank
        torch.set_num_threads(1)

    def serve_transport(self, src, meta, tensors):
        op = meta.get("op")
        if op == "echo":
            return {"meta": meta, "src": src, "rank": self.rank}, tensors
        if op == "mix":
            return expected_reply(src, self.rank, meta, tensors)
        if op == "fail":
            raise ValueError("asked to fail")
        if op == "bad_reply":
            return {"not plain": object()}, []
        raise ValueError(f"unknown op {op!r}")

    def call(self, dst, meta, tensors):
        return self.transport.call(dst, meta, tensors)

    def hammer(self, targets: list[int], iterations: int, num_threads: int, many: bool) -> dict:
        """`num_threads` threads each make `iterations` calls (one call_many over all `targets`, or
        one call to a target in turn) with fresh random tensors, and check every reply."""
        mismatches, errors = [], []

        def run(k: int) -> None:
            g = torch.Generator().manual_seed(1000 * self.rank + k)
            for i in range(iterations):
                dsts = targets if many else [targets[i % len(targets)]]
                reqs = []
                for d in dsts:
                    n = int(torch.randint(1, 2000, (1,), generator=g))
                    ts = [random_tensor((n,), DTYPES[(i + d) % 4], g),
                          random_tensor((3, 5), torch.int64, g)]
                    reqs.append((d, {"op": "mix", "id": [self.rank, k, i, d]}, ts))
                try:
                    replies = self.transport.call_many(reqs)
                except TransportError as e:
                    errors.append(str(e))
                    continue
                for (d, meta, ts), (rmeta, rts) in zip(reqs, replies):
                    emeta, ets = expected_reply(self.rank, d, meta, ts)
                    if rmeta != emeta or not all(map(bit_equal, rts, ets)):
                        mismatches.append((meta["id"], rmeta))

        threads = [threading.Thread(target=run, args=(k,)) for k in range(num_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"mismatches": mismatches, "errors": errors}

    def round_trip_s(self, dst: int, nbytes: int, iterations: int) -> float:
        x = [torch.zeros(nbytes, dtype=torch.uint8)]
        for _ in range(3):
            self.transport.call(dst, {"op": "echo"}, x)
        times = []
        for _ in range(iterations):
            t0 = time.perf_counter()
            self.transport.call(dst, {"op": "echo"}, x)
            times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]


def start_ray() -> None:
    # Workers import `actors` from the checkout; this module's classes travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})


@pytest.fixture(scope="module")
def actors():
    start_ray()
    peers = [Peer.remote(r) for r in range(NUM_ACTORS)]
    yield peers
    ray.shutdown()


@pytest.fixture(scope="module", params=BACKENDS)
def group(request, actors):
    options = {"inline_bytes": INLINE} if request.param == "torch" else {}
    connect_group(actors, request.param, timeout_s=CALL_TIMEOUT_S, **options)
    yield request.param, actors
    # Every rank closes concurrently, so every service thread ends (peers said goodbye).
    assert close_group(actors, wait_s=20), "service threads still running after all ranks closed"


def get(refs):
    return ray.get(refs, timeout=CALL_TIMEOUT_S)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="transport backend 'nccl' is unknown; choose one of"):
        create_transport("nccl", rank=0, world_size=1)


def test_echo_is_bit_exact(group):
    _, actors = group
    g = torch.Generator().manual_seed(0)
    tensors = [random_tensor((17, 33), dtype, g) for dtype in DTYPES]
    tensors += [random_tensor((5, 7), torch.float32, g).t(),          # not contiguous
                torch.tensor(3.5, dtype=torch.float64),                # 0-dim
                torch.empty(0, 9, dtype=torch.bfloat16),               # no elements
                random_tensor((INLINE // 2 + 123,), torch.bfloat16, g)]  # > INLINE: header + body
    meta = {"op": "echo", "n": 7, "x": 1.25, "s": "héllo", "l": [1, [2, 3]], "none": None}
    for dst in range(NUM_ACTORS):     # dst 0 is the caller itself: served inline
        rmeta, out = get(actors[0].call.remote(dst, meta, tensors))
        assert rmeta == {"meta": meta, "src": 0, "rank": dst}
        assert len(out) == len(tensors)
        for a, b in zip(out, tensors):
            assert bit_equal(a, b), (a.dtype, a.shape)


def test_empty_tensor_list(group):
    _, actors = group
    assert get(actors[1].call.remote(2, {"op": "echo"}, [])) == \
        ({"meta": {"op": "echo"}, "src": 1, "rank": 2}, [])


def test_both_directions_at_once(group):
    _, actors = group
    a, b = actors[0], actors[1]
    results = get([a.hammer.remote([1], 150, 4, False), b.hammer.remote([0], 150, 4, False)])
    assert results == [{"mismatches": [], "errors": []}] * 2


def test_all_to_all_call_many_from_every_actor(group):
    _, actors = group
    refs = [a.hammer.remote([d for d in range(NUM_ACTORS) if d != r] + [r], 100, 3, True)
            for r, a in enumerate(actors)]
    assert get(refs) == [{"mismatches": [], "errors": []}] * NUM_ACTORS


def test_handler_error_comes_back_and_link_survives(group):
    _, actors = group
    with pytest.raises(TransportError, match="rank 2 failed to serve a call from rank 0: "
                                             "ValueError: asked to fail"):
        get(actors[0].call.remote(2, {"op": "fail"}, [torch.ones(3)]))
    with pytest.raises(ValueError, match="meta must hold plain values"):
        get(actors[0].call.remote(2, {"op": "echo", "bad": {1, 2}}, []))
    with pytest.raises(TransportError, match="rank 1 failed .* meta must hold plain values"):
        get(actors[0].call.remote(1, {"op": "bad_reply"}, []))
    assert get(actors[0].call.remote(2, {"op": "echo"}, []))[0]["rank"] == 2


def test_stats_count_bytes(group):
    _, actors = group
    before = get([a.transport_stats.remote() for a in actors[:2]])
    payload = torch.zeros(10_000, dtype=torch.int32)            # 40 KB each way
    for _ in range(3):
        get(actors[0].call.remote(1, {"op": "echo"}, [payload]))
    after = get([a.transport_stats.remote() for a in actors[:2]])
    delta = [{k: after[i][k] - before[i][k] for k in after[i]} for i in range(2)]
    assert delta[0]["num_calls"] == 3 and delta[1]["num_served"] == 3
    for d in delta:
        assert 3 * 40_000 <= d["bytes_sent"] < 3 * 40_000 + 3 * 1024
        assert 3 * 40_000 <= d["bytes_received"] < 3 * 40_000 + 3 * 1024


def test_round_trip_benchmark(group, capsys):
    backend, actors = group
    rows = measure(actors, backend)
    with capsys.disabled():
        print()
        for nbytes, seconds in rows:
            print(f"[transport bench] {backend:5s} {nbytes / 1024:8.0f} KiB round trip: "
                  f"{seconds * 1e3:7.3f} ms (median)")


def test_closed_rank_fails_calls_cleanly(group):
    """Keep this test last: it closes rank 2 (the fixture then closes the others)."""
    backend, actors = group
    # gloo service threads answer (with errors) until their peers close; Ray has no threads.
    assert get(actors[2].close_transport.remote()) is (backend == "ray")
    for src in (0, 1):
        with pytest.raises(TransportError, match="closed"):
            get(actors[src].call.remote(2, {"op": "echo"}, []))
    with pytest.raises(TransportError, match="closed"):
        get(actors[2].call.remote(0, {"op": "echo"}, []))
    assert get(actors[0].call.remote(1, {"op": "echo"}, []))[0]["rank"] == 1


def measure(actors, backend: str) -> list[tuple[int, float]]:
    sizes = [(32 * 1024, 200), (4 * 1024 * 1024, 20)]
    return [(n, get(actors[0].round_trip_s.remote(1, n, iters))) for n, iters in sizes]


if __name__ == "__main__":
    start_ray()
    peers = [Peer.remote(r) for r in range(2)]
    for backend in BACKENDS:
        connect_group(peers, backend)      # default frame size (1 MiB): 32 KiB and 4 MiB as used
        for nbytes, seconds in measure(peers, backend):
            print(f"{backend:5s} {nbytes / 1024:8.0f} KiB round trip: {seconds * 1e3:7.3f} ms")
        close_group(peers)
    ray.shutdown()
