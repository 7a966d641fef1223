"""Prefix caching across instances on a real embedded Ray fabric: a prefix cached on one instance
used by another (lease, copy, recompute), cache-aware routing, a controller restart (misses,
never wrong KV), and a soak with eviction, borrowing and cancelled streams that ends with every
pool free and nothing cached.

The reference is an in-process `Engine` with the cache off over the fabric's model (the default
config: preset tiny-llama, seed 0, float32: the same weights). No test asserts how long anything
took: polling deadlines only stop a broken run from hanging."""

import random
import threading
import time

import pytest

ray = pytest.importorskip("ray")
import fabric  # noqa: E402
from fabric.engine import Engine  # noqa: E402
from fabric.model import load_model  # noqa: E402
from fabric.sequence import SamplingParams  # noqa: E402

DEADLINE_S = 60.0
BS = 8


def toks(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 256) for _ in range(n)]


def wait_until(cond, timeout_s: float = DEADLINE_S) -> bool:
    """Poll `cond` (exceptions count as False: a controller may be restarting)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            if cond():
                return True
        except Exception:
            pass
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="kv-fabric")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def reference():
    """Greedy tokens of the fabric's model with the prefix cache off (memoised per prompt; the
    tokens for n new tokens are the first n of a longer run, as EOS is ignored)."""
    model = load_model("tiny-llama")
    memo: dict[tuple, list[int]] = {}

    def ref(prompts: list[list[int]], n: int) -> list[list[int]]:
        todo = [p for p in prompts if len(memo.get(tuple(p), ())) < n]
        if todo:
            eng = Engine(model, kv_blocks=4096, block_size=BS, prefix_cache=False)
            for p, s in zip(todo, eng.generate(todo, SamplingParams(max_new_tokens=n,
                                                                    ignore_eos=True))):
                memo[tuple(p)] = s.output
        return [memo[tuple(p)][:n] for p in prompts]

    return ref


def prefix_totals(fab) -> dict:
    return fab.stats()["prefix_cache"]


def heartbeats(fab) -> int:
    return ray.get(fab.controller.stats.remote(), timeout=DEADLINE_S)["calls"]["heartbeat"]


def settle(fab, beats: int = 6) -> None:
    """Wait for a few more heartbeats: the controller's view of every instance's load is then
    newer than the last request."""
    start = heartbeats(fab)
    assert wait_until(lambda: heartbeats(fab) >= start + beats), "heartbeats stopped"


def reset_and_wait_empty_index(fab) -> None:
    fab.reset_prefix_cache()
    assert wait_until(lambda: prefix_totals(fab)["index_blocks"] == 0), \
        "the index still names evicted blocks"


def all_idle_and_free(fab, pinned_too: bool = True) -> bool:
    st = fab.stats()
    per = st["prefix_cache"]["instances"]
    return all(s["blocks_free"] == s["blocks_total"] and s["blocks_lent"] == 0
               and s["blocks_borrowed"] == 0 and s["detail"]["num_running"] == 0
               and s["detail"]["num_waiting"] == 0 for s in st["instances"]) and \
        (not pinned_too or all(p["blocks_pinned_for_others"] == 0 for p in per.values()))


def decode_over_a_lease(fab, prompts, n: int, holder: int):
    """Generate `prompts` (sharing the prefix `holder` caches) in a thread; return (thread,
    its results' dict) once the other instance's request reads the prefix leased there."""
    settle(fab)
    out: dict = {}
    worker = threading.Thread(target=lambda: out.update(r=fab.generate(
        prompts, max_new_tokens=n, ignore_eos=True)))
    worker.start()
    reader = 1 - holder
    assert wait_until(lambda: prefix_totals(fab)["instances"][reader]["leased_hits"] > 0,
                      timeout_s=120), "no request leased the holder's prefix"
    return worker, out


# ---- 8. a prefix cached on another instance: lease, copy, recompute ---------------------------
@pytest.mark.parametrize("mode", ["lease", "copy", "recompute"])
def test_prefix_cached_on_another_instance(local_ray, reference, mode):
    rng = random.Random(300)
    shared = toks(rng, 100)                       # 12 full blocks of 8, then 4 more tokens
    prompts = [shared + toks(rng, n) for n in (9, 14, 6)]
    n = 10
    ref = reference(prompts, n)
    cfg = {"instances": {"count": 2, "kv_blocks": 64, "block_size": BS},
           "prefix_cache": {"remote": mode, "overlap_weight": 0.0}}
    with fabric.start(cfg) as fab:
        warm = fab.generate(prompts, max_new_tokens=n, ignore_eos=True)
        assert [r.tokens for r in warm] == ref
        reset_and_wait_empty_index(fab)
        before = prefix_totals(fab)

        (r0,) = fab.generate([prompts[0]], max_new_tokens=n, ignore_eos=True)
        assert r0.tokens == ref[0]
        assert r0.metrics["cached_tokens"] == 0, "the cache was reset"
        holder = r0.home
        assert wait_until(lambda: prefix_totals(fab)["index_blocks"] > 0), \
            "the holder never published its cached blocks"
        settle(fab)

        r1, r2 = fab.generate(prompts[1:], max_new_tokens=n, ignore_eos=True)
        assert [r1.tokens, r2.tokens] == ref[1:], f"{mode}: tokens differ from the reference"
        on_holder = [r for r in (r1, r2) if r.home == holder]
        elsewhere = [r for r in (r1, r2) if r.home != holder]
        assert len(on_holder) == 1 and len(elsewhere) == 1, [r.home for r in (r1, r2)]
        assert on_holder[0].metrics["cached_tokens"] == 96
        cached_elsewhere = elsewhere[0].metrics["cached_tokens"]
        if mode == "recompute":
            assert cached_elsewhere == 0
        else:
            assert cached_elsewhere == 96, f"{mode}: the prefix elsewhere was not reused"
        # its TTFT counts the pin (and the copy) done before admission: they are in queued_s
        m = elsewhere[0].metrics
        assert m["ttft_s"] >= m["queued_s"] >= m["prefix_fetch_s"] > 0, m

        after = prefix_totals(fab)
        remote = {k: after["remote"][k] - before["remote"][k] for k in after["remote"]}
        assert remote[mode] >= 1, remote
        assert all(remote[m] == 0 for m in ("lease", "copy", "recompute") if m != mode), remote
        if mode == "lease":
            assert after["leased_hits"] - before["leased_hits"] == 96
            assert remote["blocks_leased"] == 12
        if mode == "copy":
            assert remote["blocks_copied"] == 12
        # nothing runs: every pin for another instance is released, every pool is free
        assert wait_until(lambda: all_idle_and_free(fab)), fab.stats()["prefix_cache"]
        (again,) = fab.generate([prompts[2]], max_new_tokens=n, ignore_eos=True)
        assert again.tokens == ref[2]


def test_holder_killed_while_a_leased_request_decodes(local_ray, reference):
    """The instance whose cache a request leases dies mid-decode: the reader recomputes the
    request (never reads lost KV), the dead holder's own request is resubmitted, both answer
    the reference tokens, and the manager replaces the holder."""
    rng = random.Random(301)
    shared = toks(rng, 100)
    prompts = [shared + toks(rng, n) for n in (11, 5, 8)]
    n = 60
    ref = reference(prompts, n)
    cfg = {"instances": {"count": 2, "kv_blocks": 64, "block_size": BS},
           "prefix_cache": {"remote": "lease", "overlap_weight": 0.0}}
    with fabric.start(cfg) as fab:
        (r0,) = fab.generate([prompts[0]], max_new_tokens=4, ignore_eos=True)
        holder = r0.home
        assert wait_until(lambda: prefix_totals(fab)["index_blocks"] > 0)
        worker, out = decode_over_a_lease(fab, prompts[1:], n, holder)
        ray.kill(fab.instances[holder], no_restart=True)
        worker.join(timeout=600)
        assert not worker.is_alive(), "a request hung after its prefix's holder died"
        assert [r.tokens for r in out["r"]] == ref[1:]
        assert wait_until(lambda: fab.stats()["elastic"]["replicas"] == 2 and
                          len(fab.stats()["instances"]) == 2, timeout_s=300)
        (again,) = fab.generate([prompts[0]], max_new_tokens=n, ignore_eos=True)
        assert again.tokens == ref[0]


@pytest.mark.parametrize("leaves", ["holder", "reader"])
def test_scale_down_while_a_request_reads_a_leased_prefix(local_ray, reference, leaves):
    """Scale 2 -> 1 (instance 1 leaves) while one request decodes over a prefix leased from the
    other instance's cache. The holder leaving: the reader's request is recomputed from its
    tokens (it never reads KV that went away). The reader leaving: its request is handed to the
    holder and its lease let go there. Either way every answer is the reference, nothing stays
    pinned, and the one replica left serves the prefix again."""
    rng = random.Random(303 if leaves == "holder" else 304)
    shared = toks(rng, 100)
    prompts = [shared + toks(rng, k) for k in (11, 5, 8)]
    other = toks(rng, 111)
    n = 380                      # both requests fit in the one pool left (2 x 61 of 128 blocks)
    ref = reference(prompts[1:], n)
    cfg = {"instances": {"count": 2, "kv_blocks": 128, "block_size": BS},
           "prefix_cache": {"remote": "lease", "overlap_weight": 0.0}}
    with fabric.start(cfg) as fab:
        # idle, equal loads: the i-th prompt of one call goes to instance i
        want = 1 if leaves == "holder" else 0
        warm = fab.generate([other, prompts[0]] if want else [prompts[0], other],
                            max_new_tokens=4, ignore_eos=True)
        holder = warm[want].home
        assert holder == want, [r.home for r in warm]
        assert wait_until(lambda: prefix_totals(fab)["index_blocks"] > 0)
        worker, out = decode_over_a_lease(fab, prompts[1:], n, holder)
        assert worker.is_alive(), f"the requests ended before the scale-down: raise n ({n})"
        event = fab.scale(1)
        worker.join(timeout=600)
        assert not worker.is_alive(), "a request hung across the scale-down"
        assert [r.tokens for r in out["r"]] == ref, f"{leaves} left: tokens differ"
        assert (event["from"], event["to"]) == (2, 1), event
        if leaves == "holder":        # the reader's request: recomputed, never reading lost KV
            assert event["debtor_requests_recomputed"] >= 1, event
            assert sum(r.metrics["num_preemptions"] for r in out["r"]) >= 1
        else:                         # the reader's request: handed to the holder
            assert event["requests_moved"] + event["requests_recomputed"] >= 1, event
        stats = fab.stats()
        assert stats["elastic"]["replicas"] == 1 and len(stats["instances"]) == 1
        assert wait_until(lambda: all_idle_and_free(fab)), fab.stats()["prefix_cache"]
        (again,) = fab.generate([prompts[1]], max_new_tokens=n, ignore_eos=True)
        assert again.tokens == ref[0]


# ---- 9-11: one fabric of small pools, default prefix-cache settings ------------------------------
SMALL = {"instances": {"count": 2, "kv_blocks": 24, "block_size": BS, "max_batch_tokens": 64}}


@pytest.fixture(scope="module")
def small(local_ray):
    fab = fabric.start(SMALL)
    yield fab
    fab.shutdown()


def test_cache_aware_routing_sends_a_prefix_home(small, reference):
    fab = small
    rng = random.Random(301)
    shared = toks(rng, 120)                        # 15 full blocks
    first = shared + toks(rng, 7)
    later = [shared + toks(rng, k) for k in (5, 11)]
    reset_and_wait_empty_index(fab)
    (r0,) = fab.generate([first], max_new_tokens=8, ignore_eos=True)
    assert r0.tokens == reference([first], 8)[0]
    assert wait_until(lambda: prefix_totals(fab)["index_blocks"] >= 15)
    settle(fab)
    for p in later:                                # one at a time, and then both in one call
        (r,) = fab.generate([p], max_new_tokens=8, ignore_eos=True)
        assert r.home == r0.home, "the request did not go where its prefix is cached"
        assert r.metrics["cached_tokens"] == 120
        assert r.tokens == reference([p], 8)[0]
        settle(fab)
    both = fab.generate(later, max_new_tokens=8, ignore_eos=True)
    assert both[0].home == r0.home and both[0].metrics["cached_tokens"] == 120
    assert [r.tokens for r in both] == reference(later, 8)
    assert wait_until(lambda: all_idle_and_free(fab))


def test_controller_restart_degrades_to_misses(small, reference):
    fab = small
    rng = random.Random(302)
    shared = toks(rng, 88)                         # 11 full blocks
    prompts = [shared + toks(rng, k) for k in (3, 9, 15, 20)]
    refs = reference(prompts, 12)
    got = fab.generate(prompts[:2], max_new_tokens=12, ignore_eos=True)
    assert [r.tokens for r in got] == refs[:2]
    assert wait_until(lambda: prefix_totals(fab)["index_blocks"] > 0)
    routes_before = ray.get(fab.controller.stats.remote(), timeout=DEADLINE_S)["calls"]["route"]
    assert routes_before > 0

    ray.kill(fab.controller, no_restart=False)     # Ray restarts it with an empty index
    assert wait_until(lambda: ray.get(fab.controller.stats.remote(), timeout=10)
                      ["calls"]["route"] == 0, 120), "the controller did not restart"
    # at once, with the index empty or half rebuilt: cached prefixes still give the same tokens
    after = fab.generate(prompts, max_new_tokens=12, ignore_eos=True)
    assert [r.tokens for r in after] == refs
    streamed = list(fab.stream(prompts[3], max_new_tokens=12, ignore_eos=True))
    assert streamed == refs[3]
    # the instances republish their caches to the new controller
    assert wait_until(lambda: prefix_totals(fab)["index_blocks"] > 0, 120), \
        "the index was never rebuilt after the restart"
    settle(fab)
    (hit,) = fab.generate([shared + toks(rng, 4)], max_new_tokens=6, ignore_eos=True)
    assert hit.metrics["cached_tokens"] == 88, "routing does not use the rebuilt index"
    assert wait_until(lambda: all_idle_and_free(fab))


def test_soak_with_eviction_borrowing_and_cancelled_streams(small, reference):
    fab = small
    rng = random.Random(303)
    heads = [toks(rng, 40), toks(rng, 72), toks(rng, 130)]

    def request(long: bool = False) -> dict:
        head = heads[2] if long else rng.choice(heads)
        suffix = toks(rng, rng.randrange(60, 100) if long else rng.randrange(1, 40))
        return {"prompt": head + suffix, "max_new_tokens": rng.randrange(4, 25),
                "ignore_eos": True}

    batches = [[request(long=(i == 0 and b % 2 == 0)) for i in range(9)] for b in range(4)]
    streams = [request() | {"max_new_tokens": 60} for _ in range(4)]
    all_prompts = [r["prompt"] for b in batches for r in b] + [s["prompt"] for s in streams]
    assert len(all_prompts) == 40
    refs = dict(zip(map(tuple, all_prompts), reference(all_prompts, 60)))
    assert any(len(r["prompt"]) + r["max_new_tokens"] > SMALL["instances"]["kv_blocks"] * BS
               for b in batches for r in b), "no request is larger than one pool"

    before = fab.stats()
    results: dict[int, list] = {}
    errors: list[BaseException] = []

    def worker(ids: list[int]) -> None:
        try:
            for b in ids:
                results[b] = fab.submit(batches[b])
        except BaseException as e:   # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=([0, 2],)),
               threading.Thread(target=worker, args=([1, 3],))]
    gens = [fab.stream(s["prompt"], max_new_tokens=s["max_new_tokens"], ignore_eos=True)
            for s in streams]
    seen: list[list[int]] = [[] for _ in streams]
    for g, got in zip(gens, seen):
        got += [next(g) for _ in range(2)]
    for t in threads:
        t.start()
    for k, (g, got) in enumerate(zip(gens, seen)):
        for tok in g:                  # cancel midway (or earlier: the stream may lag behind)
            got.append(tok)
            if len(got) >= 5 + 3 * k:
                break
        g.close()                      # leaves the loop: the request is cancelled
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads), "the soak hangs"
    assert not errors, errors

    for b, batch in enumerate(batches):
        for req, res in zip(batch, results[b]):
            want = refs[tuple(req["prompt"])][:req["max_new_tokens"]]
            assert res.finish_reason == "length" and res.tokens == want, \
                f"batch {b}: a request of {len(req['prompt'])} tokens diverged"
    for s, got in zip(streams, seen):
        assert got == refs[tuple(s["prompt"])][:len(got)], "a cancelled stream diverged"

    mid = fab.stats()
    d = {k: mid["prefix_cache"][k] - before["prefix_cache"][k] for k in ("hits", "evictions")}
    assert d["hits"] > 0 and d["evictions"] > 0, d
    assert mid["lending"]["borrow_events"] > before["lending"]["borrow_events"], "nothing borrowed"

    def clean() -> bool:
        fab.reset_prefix_cache()       # aborts and unpins arrive asynchronously: evict again
        st = fab.stats()               # check_integrity() on every instance
        return all_idle_and_free(fab) and all(
            s["detail"]["prefix_cache"]["blocks_cached"] == 0 for s in st["instances"])

    assert wait_until(clean), fab.stats()["instances"]
    st = fab.stats()
    assert st["prefix_cache"]["blocks_cached"] == 0
    assert all(s["blocks_free"] == s["blocks_total"] for s in st["instances"])
