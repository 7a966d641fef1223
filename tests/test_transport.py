"""The data-plane transport between real Ray actors, for both backends ("torch" over gloo, "ray"):
bit-exact round trips, calls in both directions and all-to-all at once (no deadlock, replies
paired with their requests), errors, stats, the message size cap (refused before sending; a
crafted header from a peer refused without allocating what it asks for), and a closed rank.

Every test sets up what it needs: the shared groups (one per backend, module-scoped) are only
called, never changed; a test that closes a rank or drops a peer builds a group of its own.
Round-trip timings are a benchmark, not a test: `python -m bench.transport`.
"""

import datetime
import os
import sys
import threading
import time

import pytest
import torch

ray = pytest.importorskip("ray")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from actors.messages import WireError, decode_split, encode_split  # noqa: E402
from actors.transport import (  # noqa: E402
    DEFAULT_MAX_MESSAGE_BYTES, ERROR, REPLY, REQUEST, RayTransport, TorchTransport,
    TransportError, TransportHost, close_group, connect_group, create_transport, frame_problem,
    transport_actor_options)

NUM_ACTORS = 3
BACKENDS = ["torch", "ray"]
CALL_TIMEOUT_S = 60            # a deadlock fails the test instead of hanging it
INLINE = 64 * 1024             # small frames here, so that the split path (header + body) runs too
CAP = 1 << 20                  # max_message_bytes of the test groups
DTYPES = [torch.float32, torch.bfloat16, torch.int32, torch.int64]
HUGE = 1 << 40                 # what a crafted header asks the receiver to allocate


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


def tasks() -> int:
    """Threads of this process."""
    return len(os.listdir("/proc/self/task"))


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
        if op == "grow":
            return {}, [torch.zeros(int(meta["nbytes"]), dtype=torch.uint8)]
        if op == "team":     # a parallel op on two threads: this serving thread forks a team
            before = tasks()
            torch.set_num_threads(2)
            a = torch.randn(512, 512)
            (a @ a).exp_()
            torch.set_num_threads(1)
            return {"before": before, "with_team": tasks()}, []
        raise ValueError(f"unknown op {op!r}")

    def call(self, dst, meta, tensors):
        return self.transport.call(dst, meta, tensors)

    def tasks(self) -> int:
        return tasks()

    def state(self) -> dict:
        t = self.transport
        return {"closed": sorted(getattr(t, "_closed_peers", ())),
                "dropped": t.dropped_peers() if hasattr(t, "dropped_peers") else {},
                "serving": sorted(th.name for th in getattr(t, "_threads", ()) if th.is_alive())}

    def send_crafted_request(self, dst: int, call_id: int, env_len: int, body_len: int,
                             inline: int, want_reply: bool):
        """Send `dst` a request frame with a header written by hand (no body follows, whatever
        it says), bypassing every check of the sending side. With `want_reply`, wait for the
        answer and return (kind, error message)."""
        from actors.messages import decode
        from actors.transport import _HEADER, _MAGIC, HEADER_BYTES, TAG_REQUEST, _tag

        t = self.transport
        wait = datetime.timedelta(seconds=CALL_TIMEOUT_S)
        if want_reply:
            frame = torch.empty(t.inline_bytes, dtype=torch.uint8)
            reply = t._pg.recv([frame], dst, _tag(call_id, 1))
        header = _HEADER.pack(_MAGIC, REQUEST, call_id, self.rank, env_len, body_len, inline, 0)
        t._pg.send([torch.frombuffer(bytearray(header), dtype=torch.uint8)], dst,
                   TAG_REQUEST).wait(wait)
        if not want_reply:
            return None
        reply.wait(wait)
        kind, _, r_env, r_body, _ = t._parse(frame, dst)
        meta, _ = decode(frame[HEADER_BYTES:HEADER_BYTES + r_body], r_env)
        return kind, meta.get("error")

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
        return {"mismatches": mismatches, "errors": errors, "calls": num_threads * iterations}


def options(backend: str) -> dict:
    return {"inline_bytes": INLINE, "max_message_bytes": CAP} if backend == "torch" \
        else {"max_message_bytes": CAP}


@pytest.fixture(scope="module")
def actors():
    # Workers import `actors` from the checkout; this module's classes travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    peers = [Peer.remote(r) for r in range(NUM_ACTORS)]
    yield peers
    ray.shutdown()


@pytest.fixture(scope="module", params=BACKENDS)
def group(request, actors):
    """A group shared by the tests that only call it (none closes or breaks a link in it)."""
    connect_group(actors, request.param, timeout_s=CALL_TIMEOUT_S, **options(request.param))
    yield request.param, actors
    # Every rank closes concurrently, so every service thread ends (peers said goodbye).
    assert close_group(actors, wait_s=20), "service threads still running after all ranks closed"


@pytest.fixture(scope="module")
def spare_actors(actors):
    """Actors for the tests that change their group; each such test connects a new group."""
    return [Peer.remote(r) for r in range(NUM_ACTORS)]


@pytest.fixture
def own_group(spare_actors):
    """`make(backend)`: a new group of the spare actors, for one test that changes it. Joining
    a group replaces whatever transport an actor had (`setup_transport`)."""
    def make(backend: str):
        connect_group(spare_actors, backend, timeout_s=CALL_TIMEOUT_S, **options(backend))
        return spare_actors

    yield make
    close_group(spare_actors, wait_s=5)


def get(refs):
    return ray.get(refs, timeout=CALL_TIMEOUT_S)


def wait_for(what, deadline_s: float = CALL_TIMEOUT_S):
    """Poll `what()` until it is truthy; the deadline only keeps a broken run from hanging."""
    end = time.monotonic() + deadline_s
    while not (value := what()) and time.monotonic() < end:
        time.sleep(0.05)
    return value


# ---- no Ray needed ---------------------------------------------------------------------------
def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="transport backend 'nccl' is unknown; choose one of"):
        create_transport("nccl", rank=0, world_size=1)


def test_size_options_are_checked():
    # Both refusals come before any socket or store is made.
    with pytest.raises(ValueError, match=r"max_message_bytes \(4096\) must be >= inline_bytes"):
        TorchTransport(0, 1, "127.0.0.1", 1, inline_bytes=8192, max_message_bytes=4096)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_message_bytes must be a positive integer"):
            RayTransport(0, 1, [None], max_message_bytes=bad)
    assert RayTransport(0, 1, [None]).max_message_bytes == DEFAULT_MAX_MESSAGE_BYTES
    assert DEFAULT_MAX_MESSAGE_BYTES >= 1 << 20   # >= the default inline_bytes


@pytest.mark.parametrize("fields, problem, receivable", [
    # (kind, call_id, env_len, body_len, inline): the message is all in the frame, or a body
    # within the cap follows: refused, but the link is usable. Otherwise it is not.
    ((REQUEST, 5, 10, HUGE, 1), "larger than max_message_bytes=1048576", True),
    ((REQUEST, 5, 10, HUGE, 0), "larger than max_message_bytes=1048576", False),
    ((REQUEST, 5, -1, 100, 1), "negative", True),
    ((REQUEST, 5, 10, -100, 0), "negative", False),
    ((REQUEST, 5, 200, 100, 1), "envelope is longer than the body", True),
    ((REQUEST, 5, 200_000, 100_000, 0), "envelope is longer than the body", True),
    ((REQUEST, 5, 10, INLINE, 1), f"longer than the {INLINE - 64} bytes a frame holds", True),
    ((REQUEST, 5, 10, 100, 2), "inline flag 2", False),
    ((REQUEST, 0, 10, 100, 1), "call id 0 is outside", False),
    ((REPLY, 5, 10, 100, 1), "kind 2 is not one of [1]", True),
], ids=["huge-inline", "huge-split", "negative-env", "negative-body-split", "env>body-inline",
        "env>body-split", "inline-longer-than-frame", "bad-inline-flag", "bad-call-id",
        "wrong-kind"])
def test_frame_problem_names_each_bad_header(fields, problem, receivable):
    got, ok_to_receive = frame_problem(*fields, kinds=(REQUEST,), inline_bytes=INLINE,
                                       max_message_bytes=CAP)
    assert problem in got and ok_to_receive is receivable


def test_frame_problem_accepts_good_headers_and_checks_replies():
    for fields in [(REQUEST, 1, 10, 100, 1), (REQUEST, 7, 10, INLINE - 64, 1),
                   (REQUEST, 7, 100, CAP, 0), (REQUEST, 7, 0, 0, 1)]:
        assert frame_problem(*fields, kinds=(REQUEST,), inline_bytes=INLINE,
                             max_message_bytes=CAP) == (None, True)
    reply = dict(kinds=(REPLY, ERROR), inline_bytes=INLINE, max_message_bytes=CAP,
                 expected_call_id=9)
    assert frame_problem(ERROR, 9, 10, 100, 1, **reply) == (None, True)
    assert "answers call 8, not call 9" in frame_problem(REPLY, 8, 10, 100, 1, **reply)[0]
    assert frame_problem(REPLY, 9, 10, CAP + 1, 0, **reply)[1] is False


# ---- on a shared group (called, never changed) -----------------------------------------------
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
    assert results == [{"mismatches": [], "errors": [], "calls": 600}] * 2


def test_all_to_all_call_many_from_every_actor(group):
    _, actors = group
    refs = [a.hammer.remote([d for d in range(NUM_ACTORS) if d != r] + [r], 100, 3, True)
            for r, a in enumerate(actors)]
    assert get(refs) == [{"mismatches": [], "errors": [], "calls": 300}] * NUM_ACTORS


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


@pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info()
                    or not os.path.isdir("/proc/self/task"), reason="needs libgomp and /proc")
def test_serving_thread_hands_back_its_openmp_team(group):
    """A handler's parallel op forks its serving thread a team of OpenMP workers; the thread
    hands it back once it has answered (torch: when no next request waits; ray: before the
    reply), so an instance's engine loop keeps the process's only team (fabric/threads.py)."""
    _, actors = group
    meta, _ = get(actors[0].call.remote(1, {"op": "team"}, []))
    assert meta["with_team"] > meta["before"]
    assert wait_for(lambda: get(actors[1].tasks.remote()) <= meta["before"])
    assert get(actors[0].call.remote(1, {"op": "echo"}, []))[0]["rank"] == 1


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


def test_message_over_the_cap_is_refused_before_sending(group):
    _, actors = group
    before = get(actors[1].transport_stats.remote())
    with pytest.raises(WireError, match=rf"rank 0: a request to rank 1 is \d+ bytes, more than "
                                        rf"max_message_bytes={CAP}"):
        get(actors[0].call.remote(1, {"op": "echo"}, [torch.zeros(CAP + 1, dtype=torch.uint8)]))
    # A reply over the cap becomes an error reply on the serving side.
    with pytest.raises(TransportError, match=rf"rank 1 failed to serve a call from rank 0: .*a "
                                             rf"reply to rank 0 is \d+ bytes, more than "
                                             rf"max_message_bytes={CAP}"):
        get(actors[0].call.remote(1, {"op": "grow", "nbytes": CAP + 1}, []))
    after = get(actors[1].transport_stats.remote())
    assert after["num_served"] - before["num_served"] == 1      # the request never arrived
    # Just under the cap travels (both ways), and the link is as good as before.
    meta, (t,) = get(actors[0].call.remote(1, {"op": "grow", "nbytes": CAP - 4096}, []))
    assert t.numel() == CAP - 4096
    assert get(actors[0].call.remote(1, {"op": "echo"}, []))[0]["rank"] == 1


def test_crafted_inline_headers_are_answered_and_the_peer_served_on(group):
    """A frame whose message is all there (inline) but whose header lies about its sizes is
    answered with an error naming the peer and the sizes; nothing of the size it announced is
    allocated, and the same peer is served on."""
    backend, actors = group
    if backend != "torch":
        pytest.skip("frame headers exist on the torch backend only")
    before = get(actors[1].transport_stats.remote())
    crafted = [(HUGE, 10, f"body_len={HUGE}, env_len=10, inline=1: the body is larger than "
                          f"max_message_bytes={CAP}"),
               (100, -1, "body_len=100, env_len=-1, inline=1: a size is negative"),
               (100, 500, "env_len=500, inline=1: the envelope is longer than the body"),
               (INLINE, 10, f"inline body is longer than the {INLINE - 64} bytes")]
    call_id = (2**31 - 1) // 4 - 1            # the transport's own ids never get this far here
    for k, (body_len, env_len, message) in enumerate(crafted):
        kind, error = get(actors[0].send_crafted_request.remote(1, call_id - k, env_len,
                                                                body_len, 1, True))
        assert kind == ERROR
        assert error.startswith("rank 1: a request frame from rank 0 announces") and \
            message in error, error
    after = get(actors[1].transport_stats.remote())
    assert after["num_refused"] - before["num_refused"] == len(crafted)
    assert after["num_served"] == before["num_served"]         # no handler saw them
    assert get(actors[1].state.remote())["dropped"] == {}
    # The same peer and the others are served as before.
    for src in (0, 2):
        assert get(actors[src].call.remote(1, {"op": "echo"}, [torch.ones(5)]))[0]["src"] == src
    assert get(actors[1].call.remote(0, {"op": "echo"}, []))[0]["rank"] == 0


def test_ray_backend_refuses_oversized_calls_and_serves_on(group):
    backend, actors = group
    if backend != "ray":
        pytest.skip("the Ray backend's handle_ray_call")
    import numpy as np

    before = get(actors[1].transport_stats.remote())
    envelope, region = encode_split({"op": "echo"}, [])
    for payload, message in [(np.zeros(CAP, dtype=np.uint8), f"rank 1: a call from rank 0 is "
                              f"{CAP + len(envelope)} bytes (envelope {len(envelope)}, tensors "
                              f"{CAP}), more than max_message_bytes={CAP}"),
                             (np.zeros(8, dtype=np.float32), "is not (bytes, 1-d uint8 array)")]:
        ok, r_envelope, r_payload = get(actors[1]._transport_handle.remote(0, envelope, payload))
        meta, _ = decode_split(r_envelope, torch.from_numpy(r_payload.copy()))
        assert ok is False and message in meta["error"], meta
    after = get(actors[1].transport_stats.remote())
    assert after["num_refused"] - before["num_refused"] == 2
    assert after["num_served"] == before["num_served"]
    for src in (0, 2):
        assert get(actors[src].call.remote(1, {"op": "echo"}, [torch.ones(5)]))[0]["src"] == src


# ---- on a group of its own (the test changes it) -----------------------------------------------
def test_crafted_body_over_the_cap_drops_only_that_peer(own_group):
    """A header announcing a body over the cap cannot be answered and served on: gloo moves a
    body only into a receive posted for all of it, so it can neither be received (that is the
    allocation refused) nor skipped. The receiver drops that peer alone and tells it so."""
    actors = own_group("torch")
    get(actors[0].send_crafted_request.remote(1, 12345, 10, HUGE, 0, False))
    dropped = wait_for(lambda: get(actors[1].state.remote())["dropped"])
    assert list(dropped) == [0]
    assert dropped[0].startswith(f"rank 1: a request frame from rank 0 announces body_len={HUGE}"
                                 f", env_len=10, inline=0: the body is larger than "
                                 f"max_message_bytes={CAP}"), dropped
    assert get(actors[1].transport_stats.remote())["num_refused"] == 1
    assert "transport-1-serves-0" not in get(actors[1].state.remote())["serving"]
    # Rank 1 said goodbye to rank 0: rank 0's calls there fail at once, not after a timeout.
    assert wait_for(lambda: 1 in get(actors[0].state.remote())["closed"])
    with pytest.raises(TransportError, match="rank 0: rank 1 has closed its transport"):
        get(actors[0].call.remote(1, {"op": "echo"}, []))
    with pytest.raises(TransportError, match="rank 1: rank 0 was dropped after a frame that "
                                             "could not be taken: .*body_len="):
        get(actors[1].call.remote(0, {"op": "echo"}, []))
    # Every other link works both ways, concurrently.
    results = get([actors[0].hammer.remote([2], 30, 2, False),
                   actors[1].hammer.remote([2], 30, 2, False),
                   actors[2].hammer.remote([0, 1], 30, 2, True)])
    assert all(r["mismatches"] == [] and r["errors"] == [] for r in results), results
    assert close_group(actors, wait_s=20), "service threads still running after all ranks closed"


@pytest.mark.parametrize("backend", BACKENDS)
def test_closed_rank_fails_calls_cleanly(own_group, backend):
    actors = own_group(backend)
    # gloo service threads answer (with errors) until their peers close; Ray has no threads.
    assert get(actors[2].close_transport.remote()) is (backend == "ray")
    for src in (0, 1):
        with pytest.raises(TransportError, match="closed"):
            get(actors[src].call.remote(2, {"op": "echo"}, []))
    with pytest.raises(TransportError, match="closed"):
        get(actors[2].call.remote(0, {"op": "echo"}, []))
    assert get(actors[0].call.remote(1, {"op": "echo"}, []))[0]["rank"] == 1
    assert close_group(actors, wait_s=20), "service threads still running after all ranks closed"
