"""KV tiers without Ray: the host tier's LRU by bytes, the disk tier's atomic, checksummed
files (a corrupt, truncated or vanished file is a miss; a full disk or a removed directory
fails writes, never reads of what is left), session time-to-live in the prefix cache, and the
engine bringing blocks up from a tier (load, compute-or-load) with greedy tokens identical to
`transformers` and to recomputing."""

import os
import random
import shutil
import threading
import time

import pytest
import torch

from fabric.engine import Engine
from fabric.prefix_cache import PrefixCache, prompt_hashes
from fabric.rmanager import RManager
from fabric.sequence import SamplingParams
from fabric.tiers import (HEADER, DiskTier, HostTier, TierCosts, TierLoad, pack, run_load,
                          unpack)

from tests.test_prefix_cache import hf_greedy, models, rand_tokens  # noqa: F401 (fixture)


def payload(rng: random.Random, n: int = 64) -> bytes:
    return bytes(rng.randrange(256) for _ in range(n))


def h(i: int) -> bytes:
    return i.to_bytes(16, "little")


# ---- 1. host and disk tiers ------------------------------------------------------------------
def test_host_tier_is_lru_by_bytes():
    rng = random.Random(201)
    host = HostTier(capacity=200)
    data = {i: payload(rng, 64) for i in range(5)}
    assert host.put(h(0), data[0]) == [] and host.put(h(1), data[1]) == []
    assert host.put(h(2), data[2]) == []
    assert host.get(h(0)) == data[0]                      # 0 is now the most recent
    out = host.put(h(3), data[3])                         # 256 > 200: the oldest (1) leaves
    assert out == [(h(1), data[1])] and h(1) not in host and host.nbytes == 192
    big = payload(rng, 500)
    assert host.put(h(9), big) == [(h(9), big)] and h(9) not in host    # larger than the tier
    assert host.clear() and host.nbytes == 0 and len(host) == 0


def test_disk_tier_round_trip_lru_and_restart(tmp_path):
    rng = random.Random(202)
    size = HEADER.size + 100
    disk = DiskTier(str(tmp_path), capacity=3 * size)
    data = {i: payload(rng, 100) for i in range(4)}
    for i in range(3):
        assert disk.put(h(i), data[i])
    assert disk.get(h(0)) == data[0]                      # 0 most recent now
    assert disk.put(h(3), data[3])                        # evicts 1, the least recently used
    assert h(1) not in disk and not os.path.exists(disk._file(h(1)))
    assert disk.take_dropped() == [h(1)]
    assert sorted(os.listdir(tmp_path)) == sorted(x.hex() + ".kv" for x in (h(0), h(2), h(3)))
    # a restarted tier finds its files again (and cleans a half-written temporary file)
    open(os.path.join(tmp_path, "tmp-deadbeef-1"), "wb").write(b"partial")
    again = DiskTier(str(tmp_path), capacity=3 * size)
    assert len(again) == 3 and again.get(h(3)) == data[3] and again.get(h(2)) == data[2]
    assert not any(n.startswith("tmp-") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("damage", ["flip", "truncate", "header", "rename", "delete"])
def test_disk_tier_damaged_file_is_a_miss(tmp_path, damage):
    rng = random.Random(203)
    disk = DiskTier(str(tmp_path), capacity=10_000)
    good, bad = payload(rng, 200), payload(rng, 200)
    disk.put(h(1), good)
    disk.put(h(2), bad)
    f = disk._file(h(2))
    raw = bytearray(open(f, "rb").read())
    if damage == "flip":
        raw[-7] ^= 0x40
        open(f, "wb").write(raw)
    elif damage == "truncate":
        open(f, "wb").write(raw[: len(raw) // 2])
    elif damage == "header":
        open(f, "wb").write(raw[:10])
    elif damage == "rename":                     # another block's file under this name
        shutil.copy(disk._file(h(1)), f)
    else:
        os.unlink(f)
    assert disk.get(h(2)) is None                  # never wrong KV
    assert h(2) not in disk and disk.get(h(1)) == good
    key = "vanished" if damage == "delete" else "corrupt"
    assert disk.errors[key] == 1


def test_disk_full_and_removed_directory(tmp_path):
    rng = random.Random(204)
    path = str(tmp_path / "tier")
    disk = DiskTier(path, capacity=10_000)
    a = payload(rng, 100)
    assert disk.put(h(1), a)
    disk.fail_writes = 2                            # the disk is full for two writes
    assert not disk.put(h(2), payload(rng, 100)) and not disk.put(h(3), payload(rng, 100))
    assert disk.errors["write_failed"] == 2 and h(2) not in disk
    assert not any(n.startswith("tmp-") for n in os.listdir(path))
    assert disk.get(h(1)) == a                      # what it holds still reads
    shutil.rmtree(path)                             # the directory goes away
    assert disk.get(h(1)) is None and disk.errors["vanished"] == 1
    b = payload(rng, 100)
    assert disk.put(h(4), b) and disk.get(h(4)) == b    # the next write makes it again


def test_pack_unpack_and_wrong_size():
    k, v = torch.randn(3, 4, 2, 5), torch.randn(3, 4, 2, 5)
    p = pack(k, v)
    k2, v2 = unpack(p, (3, 4, 2, 5), torch.float32)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    assert unpack(p[:-4], (3, 4, 2, 5), torch.float32) is None
    assert unpack(p, (3, 4, 2, 5), torch.float64) is None


def test_costs_choose_by_measured_speeds():
    c = TierCosts()
    tiers = ["host"] * 8
    assert c.choose("load", tiers, 16, 1e-3) == "load"          # a fixed policy is kept
    est = c.estimates(tiers, 16, 1e-3)
    assert est["compute_or_load"] < min(est["load"], est["recompute"])
    assert c.choose("auto", tiers, 16, 1e-3) == "compute_or_load"
    for _ in range(30):
        c.observe_load("host", 4, 40.0)                          # a very slow tier
    assert c.estimates(tiers, 16, 1e-3)["load"] > 50
    assert c.choose("auto", [], 16, 1e-3) in ("recompute", "compute_or_load")
    fast = TierCosts()
    share = fast.head_share(["host"] * 4, 16, 1e-3)             # 2 ms a block against 16 ms
    assert share == pytest.approx(2e-3 / (2e-3 + 16e-3))
    assert fast.head_share([], 16, 1e-3) == 0.0


def test_costs_learn_how_far_compute_and_load_overlap():
    """Compute-or-load runs that take as long as computing and loading one after the other
    (they share the cores) make `auto` stop choosing it; runs as expected keep it."""
    tiers, bs, per_token = ["host"] * 8, 16, 1.6e-4   # load 21 ms, compute 20 ms
    c = TierCosts()
    est, parallel = c.estimates(tiers, bs, per_token), c.parallel_s(tiers, bs, per_token)
    assert est["compute_or_load"] == parallel and c.overlap == 1.0
    assert c.choose("auto", tiers, bs, per_token) == "compute_or_load"
    for _ in range(5):
        c.observe_both(parallel, parallel)                                  # as expected
    assert c.overlap == pytest.approx(1.0) and c.overlap_runs == 5
    assert c.choose("auto", tiers, bs, per_token) == "compute_or_load"
    serial = est["load"] + est["recompute"]
    for _ in range(30):          # no overlap at all: the estimate follows the runs, not their root
        c.observe_both(c.parallel_s(tiers, bs, per_token), serial)
    assert c.overlap == pytest.approx(serial / parallel, rel=0.01)
    assert c.estimates(tiers, bs, per_token)["compute_or_load"] == pytest.approx(serial, rel=0.01)
    assert c.choose("auto", tiers, bs, per_token) == "recompute"            # the cheaper alone
    c.observe_both(None, 1.0)                                               # nothing to compare
    c.observe_both(1e-3, 1e6)                                               # an outlier: capped
    assert c.overlap <= TierCosts.OVERLAP_RANGE[1] and c.overlap_runs == 36


# ---- 2. sessions in the prefix cache ------------------------------------------------------------
def test_session_blocks_are_protected_until_expiry_and_give_way_last():
    cache = PrefixCache()
    for b in range(6):
        cache.register(h(b), b)
        cache.park(b)
    cache.protect("s1", [0, 1], expires_at=100.0)
    cache.protect("s2", [2], expires_at=50.0)
    assert cache.num_evictable == 6 and set(cache.protected) == {0, 1, 2}
    assert [b for b, _ in cache.evict(3)] == [3, 4, 5]          # unprotected go first
    assert cache.num_session_evictions == 0
    assert [b for b, _ in cache.evict(1)] == [2]                # then the nearest expiry (s2)
    assert cache.num_session_evictions == 1 and "s2" not in cache.sessions
    cache.check_integrity()
    cache.unpark(0)                                               # the next turn uses block 0
    assert cache.expire(99.0) == 0 and cache.expire(100.0) == 1
    assert set(cache.evictable) == {1} and not cache.protected
    assert cache.num_session_expiries == 1
    cache.check_integrity()


def test_rmanager_keeps_a_finished_session_turn():
    rm = RManager(0, num_blocks=8, block_size=4)
    rm.allocate("t1", 13)                                # 4 blocks, 3 full
    hashes = [h(i) for i in range(3)]
    rm.register_computed("t1", hashes, 0)
    rm.keep_session("t1", "chat", expires_at=time.monotonic() + 60)
    assert len(rm.cache.protected) == 3 and rm.num_free == 8     # counted as room
    rm.check_integrity()
    assert rm.allocate("big", 8 * 4 - 4 * 4 + 1)          # needs 5 free: the 4 unprotected ...
    assert rm.cache.num_session_evictions == 0            # ... plus none protected
    rm.free("big")
    assert rm.allocate("big2", 8 * 4)                      # all 8: sessions give way
    assert rm.cache.num_session_evictions == 3 and not rm.cache.sessions
    rm.free("big2")
    rm.check_integrity()


# ---- 3. the engine bringing blocks up from a tier ----------------------------------------------
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def engine_with_host(models, kv_blocks=24):
    eng = Engine(models[0], kv_blocks=kv_blocks, block_size=8, max_batch_tokens=32)
    host = HostTier(capacity=1 << 30)

    def sink(hashes, k, v):
        for j, hh in enumerate(hashes):
            host.put(hh, pack(k[:, j], v[:, j]))
    eng.set_tier_sink(sink)
    return eng, host


def fill_host(eng, host, prompt, rng):
    """Run `prompt`, then push its blocks out of the pool (into `host`) with other prompts."""
    eng.generate([prompt], GREEDY)
    hashes = prompt_hashes(prompt, 8, eng.scheduler.salt)
    while any(x in eng.rm.cache.block_of for x in hashes):
        eng.generate([rand_tokens(rng, 8 * 6)], SamplingParams(max_new_tokens=2, ignore_eos=True))
    assert all(x in host for x in hashes)
    return hashes


def plan_load(eng, host, prompt, mode, delay=0.0, head_share=1.0):
    """What an instance does: the plan for `prompt`'s blocks in `host`, and a loader (a thread
    per load, as `TierClient`) for the scheduler to start at admission."""
    hashes = prompt_hashes(prompt, 8, eng.scheduler.salt)
    k = len(eng.rm.cache.lookup(hashes))
    threads, loads = [], []

    def fetch(hs):
        time.sleep(delay)
        return [("host", host.get(x)) if x in host else None for x in hs]

    def loader(ld):
        try:
            run_load(ld, fetch, eng.kv.write_blocks, eng.block_shape, eng.kv.k.dtype, 2)
        finally:
            rest = ld.finish()
            if rest:
                eng.scheduler.load_returns.put(rest)

    def start(ld):
        loads.append(ld)
        threads.append(threading.Thread(target=loader, args=(ld,)))
        threads[-1].start()
    eng.scheduler.start_load = start
    return (k, hashes[k:], mode, head_share, None), threads, loads


def run_with_plan(eng, prompt, plan):
    rid = eng.add_request(prompt, GREEDY)
    eng.seqs[rid].tier_plan = plan
    while eng.has_unfinished():
        for s in eng.step()[1]:
            if s.req_id == rid:
                return s


def settle(eng, threads):
    for t in threads:
        t.join(timeout=60)
    eng.step()                                         # frees what the loaders gave back
    eng.rm.check_integrity()
    assert not eng.rm.importing and not eng.rm.loading


@pytest.mark.parametrize("mode,delay,share", [("load", 0.0, 0.0), ("compute_or_load", 0.0, 1.0),
                                              ("compute_or_load", 0.05, 1.0),
                                              ("compute_or_load", 0.05, 0.3)])
def test_engine_loads_blocks_from_a_tier_identically(models, mode, delay, share):
    rng = random.Random(205)
    prompt = rand_tokens(rng, 8 * 9 + 3)              # 9 full blocks below after eviction
    eng, host = engine_with_host(models)
    fill_host(eng, host, prompt, rng)
    plan, threads, loads = plan_load(eng, host, prompt, mode, delay, share)
    met = []
    eng.scheduler.load_met = met.append
    seq = run_with_plan(eng, prompt, plan)
    assert len(loads) == 1 and loads[0].meet == (int(9 * share) if mode != "load" else 0)
    assert seq.output == hf_greedy(models, prompt, GREEDY.max_new_tokens)
    m = seq.metrics()
    assert m["tier_policy"] == mode                    # how much each side did is timing
    assert m["tier_loaded_tokens"] + m["tier_computed_tokens"] == 9 * 8
    if mode == "load":
        assert m["tier_loaded_tokens"] == 9 * 8 and m["cached_tokens"] == 9 * 8
    if share < 1:                       # the head up to the meeting point, then the loader
        assert m["tier_computed_tokens"] == int(9 * share) * 8
    # a compute-or-load that met its loader reports how long that took (TierCosts learns it)
    # (none when nothing came up before the prefill had computed it all)
    assert met == [] if mode == "load" else met in ([], [loads[0]])
    assert all(ld.met_s > 0 and ld.predicted_s is None for ld in met)
    if mode == "compute_or_load" and m["tier_loaded_tokens"] > 0:
        assert met == [loads[0]]
    settle(eng, threads)
    # the loaded blocks are cached again: the same prompt now hits the pool
    again = eng.generate([prompt], GREEDY)[0]
    assert again.output == seq.output and again.cached_tokens == 9 * 8


def test_missing_block_below_is_computed_and_cancel_frees(models):
    rng = random.Random(206)
    prompt = rand_tokens(rng, 8 * 6 + 1)
    eng, host = engine_with_host(models)
    hashes = fill_host(eng, host, prompt, rng)
    host.remove(hashes[4])                             # a hole: only block 5 can come up
    plan, threads, _ = plan_load(eng, host, prompt, "load")
    seq = run_with_plan(eng, prompt, plan)
    assert seq.output == hf_greedy(models, prompt, GREEDY.max_new_tokens)
    assert seq.metrics()["tier_loaded_tokens"] == 8
    settle(eng, threads)
    # a load whose request goes away gives every block back
    fill_host(eng, host, prompt, rng)
    host.remove(hashes[4])
    host.put(hashes[4], b"x")                          # the wrong size: also a miss
    plan, threads, loads = plan_load(eng, host, prompt, "compute_or_load", delay=0.05)
    rid = eng.add_request(prompt, GREEDY)
    eng.seqs[rid].tier_plan = plan
    eng.step()                                         # admitted: the load starts
    assert loads and eng.rm.loading
    eng.abort(rid)
    settle(eng, threads)


def test_no_room_for_the_blocks_below_computes_them(models):
    rng = random.Random(209)
    prompt = rand_tokens(rng, 8 * 9 + 3)
    eng, host = engine_with_host(models)
    fill_host(eng, host, prompt, rng)
    hold = eng.add_request(rand_tokens(rng, 8 * 18), SamplingParams(max_new_tokens=40,
                                                                   ignore_eos=True))
    eng.step()                                         # 19 of 24 blocks held by a long request
    plan, threads, loads = plan_load(eng, host, prompt, "load")
    seq = run_with_plan(eng, prompt, plan)
    assert not loads and seq.metrics()["tier_policy"] == "recompute"
    assert eng.scheduler.tiers["no_room"] == 1
    assert seq.output == hf_greedy(models, prompt, GREEDY.max_new_tokens)
    while eng.has_unfinished():
        eng.step()
    assert hold not in eng.seqs
    settle(eng, threads)


def test_session_turn_keeps_its_kv_for_the_next_turn(models):
    rng = random.Random(207)
    eng = Engine(models[0], kv_blocks=20, block_size=8, max_batch_tokens=32)
    turn1 = rand_tokens(rng, 8 * 5 + 2)
    p = SamplingParams(max_new_tokens=6, ignore_eos=True, session_id="chat-1", ttl_s=60)
    first = eng.generate([turn1], p)[0]
    assert eng.prefix_stats()["sessions"] == 1 and eng.prefix_stats()["blocks_protected"] > 0
    # other traffic that needs the pool's room evicts other blocks first, not the session's
    traffic = [rand_tokens(rng, 8 * 9) for _ in range(3)]
    short = SamplingParams(max_new_tokens=2, ignore_eos=True)
    for t in traffic:
        eng.generate([t], short)
    assert eng.prefix_stats()["evictions"] > 0
    turn2 = turn1 + first.output + rand_tokens(rng, 5)
    second = eng.generate([turn2], p)[0]
    assert second.output == hf_greedy(models, turn2, 6)
    assert second.cached_tokens >= 8 * 5
    # without a session the same traffic evicts the first turn (least recently used)
    eng2 = Engine(models[0], kv_blocks=20, block_size=8, max_batch_tokens=32)
    eng2.generate([turn1], SamplingParams(max_new_tokens=6, ignore_eos=True))
    for t in traffic:
        eng2.generate([t], short)
    miss = eng2.generate([turn2], SamplingParams(max_new_tokens=6, ignore_eos=True))[0]
    assert miss.cached_tokens < second.cached_tokens
    # a request too large for the free blocks still runs: the session gives way, counted
    big = eng.generate([rand_tokens(rng, 8 * 19)], SamplingParams(max_new_tokens=4, ignore_eos=True))[0]
    assert big.output and eng.prefix_stats()["session_evictions_under_pressure"] > 0
    eng.rm.check_integrity()


def test_session_ttl_expires(models):
    rng = random.Random(208)
    eng = Engine(models[0], kv_blocks=20, block_size=8, max_batch_tokens=32)
    p = SamplingParams(max_new_tokens=2, ignore_eos=True, session_id="s", ttl_s=0.2)
    eng.generate([rand_tokens(rng, 8 * 3 + 1)], p)
    assert eng.prefix_stats()["blocks_protected"] == 3
    time.sleep(0.3)
    eng.generate([rand_tokens(rng, 9)], SamplingParams(max_new_tokens=1))
    st = eng.prefix_stats()
    assert st["blocks_protected"] == 0 and st["session_expiries"] == 1
    assert st["blocks_evictable"] >= 3


@pytest.mark.parametrize("bad,msg", [({"session_id": ""}, "session_id"),
                                     ({"session_id": 5}, "session_id"),
                                     ({"session_id": "a", "ttl_s": -1}, "ttl_s"),
                                     ({"session_id": "a", "ttl_s": "1"}, "ttl_s"),
                                     ({"ttl_s": 5}, "needs a session_id")])
def test_bad_session_fields_are_request_errors(models, bad, msg):
    from fabric.errors import RequestError

    eng = Engine(models[0], kv_blocks=8, block_size=8)
    with pytest.raises(RequestError, match=msg):
        eng.add_request([5, 6, 7], SamplingParams(max_new_tokens=2, **bad))


# ---- 4. config, index and routing --------------------------------------------------------------
@pytest.mark.parametrize("tiers,field", [
    ({"host_bytes": -1}, "tiers.host_bytes"), ({"disk_bytes": 10}, "tiers.disk_path"),
    ({"disk_path": "  ", "disk_bytes": 10}, "tiers.disk_path"), ({"prefill": "fast"}, "tiers.prefill"),
    ({"host_bytes": "1GB"}, "tiers.host_bytes"), ({"min_load_blocks": -2}, "tiers.min_load_blocks"),
    ({"hosts": 1}, "tiers.hosts")])
def test_tiers_config_errors_name_the_field(tiers, field):
    from fabric.config import load_config
    from fabric.errors import ConfigError

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config({"tiers": tiers})
    with pytest.raises(ConfigError, match="session_ttl_s"):
        load_config({"prefix_cache": {"session_ttl_s": -1}})
    ok = load_config({"tiers": {"host_bytes": 1 << 20}}).tiers
    assert ok.enabled and ok.prefill == "auto" and not load_config({}).tiers.enabled


def test_tier_index_and_routing_credit():
    from fabric.routing import Load, PrefixIndex, TierIndex, route

    hashes = [h(i) for i in range(10)]
    tiers = TierIndex()
    assert tiers.apply("nodeA", 1, None, [(x, "host") for x in hashes[:6]] +
                       [(x, "disk") for x in hashes[6:]], [])
    assert not tiers.apply("nodeA", 3, 2, [], [])               # does not follow: refused
    assert tiers.apply("nodeA", 2, 1, [(hashes[0], "disk")], [(hashes[0], "host")])
    assert tiers.tier_of("nodeA", hashes[0]) == {"disk"}
    assert tiers.blocks_per_tier() == {"host": 5, "disk": 5} and len(tiers) == 10
    assert tiers.run("nodeA", hashes, 0) == 10 and tiers.run("nodeB", hashes, 0) == 0
    pool = PrefixIndex()
    pool.apply(1, 1, None, hashes[:2], [])                       # rank 1 (node B) has 2 blocks
    node_of = {0: "nodeA", 1: "nodeB"}
    loads = {0: Load(), 1: Load()}
    (r,) = route([(hashes, 12)], [0, 1], dict(loads), pool, tiers=tiers, node_of=node_of)
    assert r.home == 0                       # 10 blocks below on A beat 2 in B's pool
    (r,) = route([(hashes, 12)], [0, 1], dict(loads), pool, tiers=None, node_of=node_of)
    assert r.home == 1                       # without the tier index: the pool hit wins
    tiers.remove_node("nodeA")
    assert tiers.run("nodeA", hashes, 0) == 0


def test_prometheus_tier_samples():
    from fabric.serving_metrics import ServingMetrics, tier_samples

    stats = {"tiers": {"host": {"blocks": 3, "bytes": 300, "hits": 2, "bytes_up": 200,
                                "bytes_down": 300},
                       "disk": None, "loaded_tokens": 32, "computed_tokens": 16},
             "prefix_cache": {"session_evictions_under_pressure": 4}}
    s = tier_samples(stats)
    assert s["kv_tier_blocks"] == [({"tier": "host"}, 3)]          # no disk tier: no sample
    assert s["kv_tier_loaded_tokens_total"] == [({}, 32)] and s["session_evictions_total"] == [({}, 4)]
    page = ServingMetrics("m").render(stats)
    assert 'kvfabric:kv_tier_hits_total{model_name="m",tier="host"} 2' in page
    assert "# TYPE kvfabric:kv_tier_bytes_down_total counter" in page
