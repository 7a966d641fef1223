"""Prefix caching without Ray: the hash chain, the cache's LRU books, reference counts of the
rManager under random operations, the engine against Hugging Face `transformers` with the same
random weights (cache on and off give the same greedy tokens), the prefix index, cache-aware
routing and the `prefix_cache:` config section."""

import os
import random
import subprocess
import sys

import pytest
import torch

from fabric.config import load_config
from fabric.engine import Engine
from fabric.errors import ConfigError
from fabric.model import load_model, save_checkpoint
from fabric.prefix_cache import (ROOT, PrefixCache, extend_hashes, hash_block, model_salt,
                                 prompt_hashes)
from fabric.rmanager import BlockRef, RManager
from fabric.routing import Load, PrefixIndex, route
from fabric.sequence import SamplingParams

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SALT = b"s" * 16


def rand_tokens(rng: random.Random, n: int, vocab: int = 256) -> list[int]:
    return [rng.randrange(3, vocab) for _ in range(n)]


# ---- 1. the hash chain --------------------------------------------------------------------------
def test_hashes_are_stable_across_processes():
    rng = random.Random(101)
    tokens = rand_tokens(rng, 53)
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from fabric.prefix_cache import prompt_hashes, model_salt\n"
            "from fabric.config import ModelConfig\n"
            "salt = model_salt(ModelConfig())\n"
            "print(','.join(h.hex() for h in prompt_hashes(%r, 8, salt)))\n" % (REPO, tokens))
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    from fabric.config import ModelConfig

    here = prompt_hashes(tokens, 8, model_salt(ModelConfig()))
    assert len(here) == 52 // 8 == 6            # the last token is never cached
    assert out.split(",") == [h.hex() for h in here]


def test_hashes_depend_on_salt_tokens_parent_and_the_whole_chain():
    rng = random.Random(102)
    tokens = rand_tokens(rng, 40)
    base = prompt_hashes(tokens, 8, SALT)
    assert len(set(base)) == len(base) == 4      # 39 tokens: 4 full blocks
    assert prompt_hashes(tokens, 8, b"t" * 16) != base
    assert all(a != b for a, b in zip(prompt_hashes(tokens, 8, b"t" * 16), base))
    blk = tokens[:8]
    assert hash_block(ROOT, blk, SALT) == base[0]
    assert hash_block(ROOT, blk, b"t" * 16) != base[0]
    assert hash_block(base[0], blk, SALT) != base[0]             # other parent
    other = list(blk)
    other[5] = (other[5] + 1) % 256
    assert hash_block(ROOT, other, SALT) != base[0]              # other tokens
    # a change in block 0 changes every later hash, although blocks 1..3 are the same tokens
    changed = list(tokens)
    changed[2] = (changed[2] + 7) % 256
    ch = prompt_hashes(changed, 8, SALT)
    assert all(a != b for a, b in zip(ch, base))
    # a change in block 2 leaves blocks 0 and 1 alone
    late = list(tokens)
    late[17] = (late[17] + 1) % 256
    lh = prompt_hashes(late, 8, SALT)
    assert lh[:2] == base[:2] and lh[2] != base[2] and lh[3] != base[3]
    # extending a partial chain gives the same hashes as computing it at once
    part = extend_hashes([], tokens, 8, SALT, upto=17)
    assert part == base[:2]
    assert extend_hashes(part, tokens, 8, SALT, upto=39) == base
    # the salt names the model: dtype, seed and preset change it
    from fabric.config import ModelConfig

    salts = {model_salt(ModelConfig()), model_salt(ModelConfig(seed=1)),
             model_salt(ModelConfig(dtype="float64")), model_salt(ModelConfig(preset="tiny-moe"))}
    assert len(salts) == 4


# ---- 2. PrefixCache -----------------------------------------------------------------------------
def test_lookup_stops_at_the_first_miss_and_eviction_is_lru():
    rng = random.Random(103)
    hashes = prompt_hashes(rand_tokens(rng, 49), 8, SALT)       # 6 blocks
    cache = PrefixCache()
    for j in (0, 1, 3, 4):                                       # block 2 is missing
        assert cache.register(hashes[j], 10 + j)
    assert not cache.register(hashes[0], 99)                    # held by another block already
    assert cache.lookup(hashes) == [10, 11]
    assert cache.lookup(hashes[3:]) == [13, 14]
    assert cache.lookup(hashes[2:]) == []
    assert cache.take_events() == [(True, hashes[j]) for j in (0, 1, 3, 4)]
    assert cache.take_events() == []
    for b in (13, 10, 14, 11):                                   # park order = LRU order
        assert cache.park(b)
    assert not cache.park(77)                                    # not cached
    cache.unpark(10)                                             # used again ...
    cache.park(10)                                               # ... and most recent now
    assert [b for b, _ in cache.evict(2)] == [13, 14]
    assert [b for b, _ in cache.evict(5)] == [11, 10]
    assert cache.num_evictions == 4 and len(cache) == 0
    assert [add for add, _ in cache.take_events()] == [False] * 4
    cache.check_integrity()


def test_freed_table_is_evicted_tail_first():
    rng = random.Random(104)
    rm = RManager(0, num_blocks=8, block_size=4, min_free_fraction=0.0)
    tokens = rand_tokens(rng, 17)
    hashes = prompt_hashes(tokens, 4, SALT)                      # 4 full blocks
    assert rm.allocate("a", 17)
    blocks = [r.block for r in rm.tables["a"]]
    rm.register_computed("a", hashes, 0)
    rm.free("a")
    rm.check_integrity()
    assert rm.num_free == 8 and rm.cache.num_evictable == 4
    assert rm.cache.lookup(hashes) == blocks[:4]
    # pressure: 4 free blocks in the pool (the 5th block was never cached), so taking 5
    # evicts one: the tail
    assert rm.allocate("b", 20)                  # 5 blocks through take_local
    assert rm.cache.lookup(hashes) == blocks[:3]
    rm.check_integrity()
    assert rm.allocate("c", 8)                   # 2 more: the next two from the tail
    assert rm.cache.lookup(hashes) == blocks[:1]
    assert {r.block for r in rm.tables["c"]} == set(blocks[1:3])
    assert rm.cache.num_evictions == 3
    rm.free("b")
    rm.free("c")
    rm.check_integrity()
    assert rm.clear_cache() == 1 and rm.pool.num_free == 8


# ---- 3. reference counts under random operations -------------------------------------------------
def test_reference_counts_under_random_operations():
    rng = random.Random(105)
    bs, n = 4, 24
    rm = RManager(0, n, bs, max_lend_fraction=0.5, min_free_fraction=0.05)
    lender = RManager(1, 16, bs, max_lend_fraction=1.0, min_free_fraction=0.0, prefix_cache=False)
    rm.borrow_fn = lambda k: [BlockRef(1, b) for b in lender.lend(0, min(k, 3))]
    rm.release_fn = lambda c, ids: lender.reclaim(0, ids)
    prefixes = [rand_tokens(rng, rng.randrange(4, 14)) for _ in range(3)]
    content: dict[int, bytes | None] = {}      # local block -> the KV it holds (by its hash)
    live: dict[str, dict] = {}                 # request -> tokens, hashes, registered
    lent: list[int] = []
    pins: list[list[int]] = []
    counts = dict.fromkeys(["alloc", "hit", "reg", "free", "lend", "reclaim", "pin", "unpin",
                            "clear", "import", "shared_ok"], 0)

    def new_request(i):
        tokens = rng.choice(prefixes) + rand_tokens(rng, rng.randrange(1, 10))
        hashes = extend_hashes([], tokens, bs, SALT)
        req = f"r{i}"
        k = rm.attach_cached(req, hashes)
        for j, r in enumerate(rm.tables.get(req, [])[:k]):
            assert content[r.block] == hashes[j], "a cached block holds other KV than its name"
        if not rm.allocate(req, len(tokens)):
            rm.free(req)
            return
        table = rm.tables[req]
        for r in table[k:]:
            if r.instance == 0:
                assert rm.refs[r.block] == 1, "a block in use was handed to another table"
                content[r.block] = None        # about to be written by this request
        live[req] = {"tokens": tokens, "hashes": hashes, "reg": k}
        counts["alloc"] += 1
        counts["hit"] += k > 0

    for step in range(600):
        op = rng.random()
        if op < 0.3 or not live:
            new_request(step)
        elif op < 0.45:
            req = rng.choice(sorted(live))
            st = live[req]
            upto = rng.randrange(st["reg"], len(st["hashes"]) + 1)
            for j in range(st["reg"], upto):           # "compute" the blocks, then cache them
                r = rm.tables[req][j]
                if r.instance == 0:
                    assert rm.refs[r.block] == 1, "a shared block would be overwritten"
                    content[r.block] = st["hashes"][j]
            rm.register_computed(req, st["hashes"][:upto], st["reg"])
            st["reg"] = upto
            counts["reg"] += 1
        elif op < 0.62:
            req = rng.choice(sorted(live))
            rm.free(req)
            del live[req]
            counts["free"] += 1
        elif op < 0.68:
            ids = rm.lend(2, rng.randint(1, 5))
            for b in ids:
                content[b] = None
            lent.extend(ids)
            counts["lend"] += bool(ids)
        elif op < 0.73 and lent:
            give = rng.sample(lent, rng.randint(1, len(lent)))
            rm.reclaim(2, give)
            for b in give:
                lent.remove(b)
            counts["reclaim"] += 1
        elif op < 0.80:
            req = rng.choice(sorted(live))
            got = rm.pin(3, live[req]["hashes"])
            for j, b in enumerate(got):
                assert content[b] == live[req]["hashes"][j]
            if got:
                pins.append(got)
                counts["pin"] += 1
        elif op < 0.86 and pins:
            rm.unpin(3, pins.pop(rng.randrange(len(pins))))
            counts["unpin"] += 1
        elif op < 0.90:
            before = rm.cache.num_evictable
            assert rm.clear_cache() == before
            assert rm.cache.num_evictable == 0
            counts["clear"] += 1
        elif op < 0.95:
            req = rng.choice(sorted(live))
            hashes = live[req]["hashes"]
            ids = rm.import_cached(2)
            if ids:
                rm.check_integrity()
                fake = [hash_block(h, [step], SALT) for h in hashes[:1]]  # names not held here
                for b, h in zip(ids, fake):
                    content[b] = h
                rm.finish_import(fake, ids)
                counts["import"] += 1
        else:
            # two tables share blocks; under full pressure take_local never hands them out
            req = rng.choice(sorted(live))
            hashes = live[req]["hashes"][:live[req]["reg"]]
            twin = f"twin{step}"
            k = rm.attach_cached(twin, hashes)
            if k:
                shared = {r.block for r in rm.tables[twin]}
                free_now = rm.num_free
                taken = rm.take_local(free_now) if free_now else []
                assert not shared & set(taken), "take_local handed out a shared block"
                with pytest.raises(MemoryError):
                    rm.take_local(1)
                assert rm.cache.lookup(hashes[:k]) == [r.block for r in rm.tables[twin]]
                for b in taken:
                    content[b] = None
                    rm._unref(b)
                counts["shared_ok"] += 1
            rm.free(twin)
        rm.check_integrity()
        lender.check_integrity()
        assert rm.num_borrowed == lender.num_lent

    assert all(v > 0 for v in counts.values()), counts
    for req in list(live):
        rm.free(req)
    for p in pins:
        rm.unpin(3, p)
    rm.reclaim(2, lent)
    rm.release_spares()
    rm.clear_cache()
    rm.check_integrity()
    assert rm.pool.num_free == n and rm.num_free == n and len(rm.cache) == 0
    assert all(r == 0 for r in rm.refs)
    assert lender.num_lent == 0 and lender.pool.num_free == 16


# ---- 4. the engine against transformers --------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    ours = load_model("tiny-llama", seed=23, dtype="float32")
    path = tmp_path_factory.mktemp("tiny-llama-prefix")
    save_checkpoint(ours, str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, hf, {}


def hf_greedy(models, prompt: list[int], n: int) -> list[int]:
    _, hf, memo = models
    key = (tuple(prompt), n)
    if key not in memo:
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        memo[key] = out[0, len(prompt):].tolist()
    return memo[key]


GREEDY = SamplingParams(max_new_tokens=10, ignore_eos=True)


def run(models, prompts, *, cache: bool, kv_blocks=200, block_size=8, max_batch_tokens=256,
        engine=None):
    engine = engine or Engine(models[0], kv_blocks=kv_blocks, block_size=block_size,
                              max_batch_tokens=max_batch_tokens, prefix_cache=cache)
    return engine, engine.generate(prompts, GREEDY)


def check_against_reference(models, prompts, seqs, off):
    for p, s, o in zip(prompts, seqs, off):
        assert s.output == o.output, "prefix cache on and off disagree"
        assert s.output == hf_greedy(models, p, GREEDY.max_new_tokens), "diverged from transformers"


def test_local_hit_and_partly_cached_prefix_match_transformers(models):
    rng = random.Random(106)
    shared = rand_tokens(rng, 27)
    prompts = [shared + rand_tokens(rng, n) for n in (6, 11, 18)]
    eng, first = run(models, prompts, cache=True)
    eng.rm.check_integrity()
    _, off = run(models, prompts, cache=False)
    check_against_reference(models, prompts, first, off)
    assert first[0].cached_tokens == 0
    # second round of the same prompts: all but the last (partial) block come from the cache
    _, again = run(models, prompts, cache=True, engine=eng)
    check_against_reference(models, prompts, again, off)
    for p, s in zip(prompts, again):
        assert s.cached_tokens == (len(p) - 1) // 8 * 8 > 0
    # new prompts sharing only the first 3 blocks (24 tokens) with the cached ones
    partial = [shared[:26] + rand_tokens(rng, n) for n in (9, 14)]
    _, part = run(models, partial, cache=True, engine=eng)
    _, part_off = run(models, partial, cache=False)
    check_against_reference(models, partial, part, part_off)
    assert [s.cached_tokens for s in part] == [24, 24]
    st = eng.prefix_stats()
    assert st["enabled"] and st["hits"] == sum(s.cached_tokens for s in first + again + part)
    assert st["queries"] == sum(map(len, prompts)) * 2 + sum(map(len, partial))
    eng.rm.check_integrity()
    assert eng.rm.num_free == 200
    assert eng.reset_prefix_cache() > 0 and eng.prefix_stats()["blocks_cached"] == 0
    assert eng.rm.pool.num_free == 200


def test_eviction_mid_flight_matches_transformers(models):
    rng = random.Random(107)
    heads = [rand_tokens(rng, 13), rand_tokens(rng, 9)]
    prompts = [rng.choice(heads) + rand_tokens(rng, rng.randrange(3, 15)) for _ in range(10)]
    # 14 blocks of 4 tokens: a request needs up to 10 blocks, so cached blocks are evicted
    # while requests that share them come and go
    eng = Engine(models[0], kv_blocks=14, block_size=4, max_batch_tokens=32, prefix_cache=True)
    _, got = run(models, prompts, cache=True, engine=eng)
    _, again = run(models, list(reversed(prompts)), cache=True, engine=eng)
    _, off = run(models, prompts, cache=False, kv_blocks=14, block_size=4, max_batch_tokens=32)
    check_against_reference(models, prompts, got, off)
    check_against_reference(models, list(reversed(prompts)), again, list(reversed(off)))
    st = eng.prefix_stats()
    assert st["evictions"] > 0 and st["hits"] > 0
    eng.rm.check_integrity()
    assert eng.rm.num_free == 14


def test_concurrent_requests_compute_a_shared_prefix_once(models):
    rng = random.Random(108)
    shared = rand_tokens(rng, 40)                     # 5 blocks of 8
    prompts = [shared + rand_tokens(rng, rng.randrange(2, 9)) for _ in range(5)]
    eng, got = run(models, prompts, cache=True)       # one batch, a fresh engine
    _, off = run(models, prompts, cache=False)
    check_against_reference(models, prompts, got, off)
    st = eng.prefix_stats()
    assert st["hits"] > 0
    # the scheduler holds the others back while the first computes the prefix: they all reuse it
    assert sorted(s.cached_tokens for s in got) == [0, 40, 40, 40, 40]
    eng.rm.check_integrity()


def test_chunked_prefill_from_the_first_uncached_token(models):
    rng = random.Random(109)
    shared = rand_tokens(rng, 31)
    prompts = [shared + rand_tokens(rng, n) for n in (4, 12, 7)]
    # 7 tokens per step with blocks of 5: chunks never line up with blocks
    eng = Engine(models[0], kv_blocks=60, block_size=5, max_batch_tokens=7, prefix_cache=True)
    _, got = run(models, prompts, cache=True, engine=eng)
    _, off = run(models, prompts, cache=False, block_size=5, max_batch_tokens=7)
    check_against_reference(models, prompts, got, off)
    assert sum(s.cached_tokens for s in got) > 0
    _, again = run(models, prompts, cache=True, engine=eng)
    check_against_reference(models, prompts, again, off)
    assert all(s.cached_tokens == (len(p) - 1) // 5 * 5 for p, s in zip(prompts, again))
    eng.rm.check_integrity()


def test_preemption_recomputes_identically_and_is_not_a_hit(models):
    rng = random.Random(110)
    shared = rand_tokens(rng, 16)
    prompts = [shared + rand_tokens(rng, 14) for _ in range(3)]      # 30 tokens each
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    # 3 requests x 6 blocks at the end, 10 blocks: requests are preempted and recomputed
    eng = Engine(models[0], kv_blocks=10, block_size=8, max_batch_tokens=64, prefix_cache=True)
    got = eng.generate(prompts, params)
    off = Engine(models[0], kv_blocks=10, block_size=8, max_batch_tokens=64,
                 prefix_cache=False).generate(prompts, params)
    assert sum(s.num_preemptions for s in got) > 0
    for p, s, o in zip(prompts, got, off):
        assert s.output == o.output == hf_greedy(models, p, 16)
    st = eng.prefix_stats()
    assert st["queries"] == sum(map(len, prompts)), "a prompt was counted more than once"
    assert st["hits"] == sum(s.cached_tokens for s in got)
    assert all(s.cached_tokens <= 16 for s in got)     # at most the shared 2 blocks
    eng.rm.check_integrity()
    assert eng.rm.num_free == 10


# ---- 5. the prefix index -------------------------------------------------------------------------
def test_prefix_index_batches_snapshots_and_removal():
    rng = random.Random(111)
    h = prompt_hashes(rand_tokens(rng, 49), 8, SALT)              # 6 hashes
    idx = PrefixIndex()
    assert idx.apply(0, 1, None, h[:4], [])
    assert idx.apply(1, 1, None, h[:2], [])
    assert idx.match(h) == {0: 4, 1: 2}
    other = prompt_hashes(rand_tokens(rng, 33), 8, SALT)
    assert idx.match(other) == {} and idx.match([]) == {}         # nothing of another prompt
    assert idx.apply(0, 2, 1, h[4:6], [h[2]])                     # follows gen 1
    assert idx.match(h) == {0: 2, 1: 2}                           # block 2 is gone from 0
    assert not idx.apply(0, 3, 1, [h[2]], [])                     # base 1 does not follow gen 2
    assert not idx.apply(2, 1, 0, [h[0]], [])                     # never seen: no base to follow
    assert idx.match(h) == {0: 2, 1: 2}
    assert idx.apply(1, 2, 1, h[2:5], [])
    assert idx.match(h) == {0: 2, 1: 5}
    assert idx.apply(0, 9, None, h[:1], [])                       # a snapshot replaces 0's entries
    assert idx.match(h) == {0: 1, 1: 5}
    assert idx.apply(0, 10, 9, h[1:3], [])
    assert idx.match(h) == {0: 3, 1: 5}
    n = len(idx)
    idx.remove_instance(1)
    assert idx.match(h) == {0: 3} and len(idx) == 3 < n
    assert not idx.apply(1, 3, 2, h[:1], [])                      # forgotten: a snapshot is due
    idx.remove_instance(0)
    assert len(idx) == 0 and idx.match(h) == {}


# ---- 6. routing ---------------------------------------------------------------------------------
def hashes_of(rng, n_blocks, bs=8, prefix=None):
    toks = (prefix or []) + rand_tokens(rng, n_blocks * bs + 1 - len(prefix or []))
    return prompt_hashes(toks, bs, SALT), toks


def test_route_goes_to_the_idle_holder_of_a_cached_prefix():
    rng = random.Random(112)
    h, _ = hashes_of(rng, 10)
    for holder in (0, 1, 2):
        idx = PrefixIndex()
        idx.apply(holder, 1, None, h, [])
        (r,) = route([(h, 12)], [0, 1, 2], {}, idx)
        assert r.home == holder and r.cached_blocks == 10 and r.source is None


def test_hot_prefix_is_balanced_over_instances():
    rng = random.Random(113)
    shared = rand_tokens(rng, 80)
    reqs = []
    for _ in range(16):
        reqs.append((hashes_of(rng, 11, prefix=shared)[0], 13))
    idx = PrefixIndex()
    idx.apply(0, 1, None, reqs[0][0][:10], [])
    routes = route(reqs, [0, 1], {}, idx)
    homes = [r.home for r in routes]
    assert homes[0] == 0
    assert homes.count(0) > 0 and homes.count(1) > 0, homes
    assert max(homes.count(0), homes.count(1)) <= 12, homes
    # requests sent away from the holder are told where the prefix is
    for r in routes:
        if r.home == 1 and r.cached_blocks < 8:
            assert r.source == (0, 10)


def test_route_spreads_when_nothing_is_cached():
    rng = random.Random(114)
    reqs = [(hashes_of(rng, 6)[0], 8) for _ in range(6)]
    homes = [r.home for r in route(reqs, [0, 1, 2], {}, PrefixIndex())]
    assert sorted(homes) == [0, 0, 1, 1, 2, 2]
    loads = {0: Load(3, 40), 1: Load(0, 0), 2: Load(1, 5)}
    (r,) = route([reqs[0]], [0, 1, 2], loads, PrefixIndex())
    assert r.home == 1 and loads[1].outstanding == 1 and loads[1].blocks_used == 8
    with pytest.raises(ValueError):
        route([reqs[0]], [], {}, PrefixIndex())


def test_requests_of_one_call_sharing_a_prefix_stay_together_until_balance():
    """Mechanics: with affinity weighted enough to beat the load term, requests of one call
    that share a prefix go where the first went, until that instance is too busy."""
    rng = random.Random(115)
    shared = rand_tokens(rng, 80)                                  # 10 blocks
    reqs = [(hashes_of(rng, 11, prefix=shared)[0], 13) for _ in range(6)]
    routes = route(reqs, [0, 1], {}, PrefixIndex(), overlap_weight=4.0, balance_threshold=1.5)
    homes = [r.home for r in routes]
    assert homes[:3] == [homes[0]] * 3, homes
    assert [r.cached_blocks for r in routes[1:3]] == [10, 10]
    assert homes[3] != homes[0], homes                             # balance says otherwise


def test_requests_of_one_call_sharing_a_prefix_are_grouped_by_default():
    """docs/prefix-cache.md: "The driver sends requests of one call that share a prefix to the
    same instance ... so `Fabric.submit` ... batches are grouped by prefix", with the default
    `overlap_weight` (1.0) and idle instances."""
    rng = random.Random(116)
    shared = rand_tokens(rng, 80)                                  # 10 blocks
    reqs = [(hashes_of(rng, 11, prefix=shared)[0], 13) for _ in range(2)]
    c = load_config({}).prefix_cache
    routes = route(reqs, [0, 1], {}, PrefixIndex(), c.overlap_weight, c.balance_threshold,
                   c.min_remote_blocks)
    assert routes[1].home == routes[0].home, \
        f"the second request of a shared-prefix pair went to {routes[1].home}, not the first's home"


def test_route_names_a_source_when_the_holder_is_busy():
    rng = random.Random(117)
    h, _ = hashes_of(rng, 10)
    idx = PrefixIndex()
    idx.apply(0, 1, None, h, [])
    loads = {0: Load(6, 30), 1: Load(0, 0)}                        # holder too busy for affinity
    (r,) = route([(h, 12)], [0, 1], loads, idx)
    assert r.home == 1 and r.cached_blocks == 0 and r.source == (0, 10)
    # fewer than min_remote_blocks more cached on the holder: no source
    idx2 = PrefixIndex()
    idx2.apply(0, 1, None, h, [])
    idx2.apply(1, 1, None, h[:9], [])
    (r2,) = route([(h, 12)], [0, 1], {0: Load(6, 30), 1: Load(0, 0)}, idx2, min_remote_blocks=2)
    assert r2.home == 1 and r2.source is None
    (r3,) = route([(h, 12)], [0, 1], {0: Load(6, 30), 1: Load(0, 0)}, idx2, min_remote_blocks=1)
    assert r3.home == 1 and r3.source == (0, 10)
    # affinity off: no cache credit, no source
    (r4,) = route([(h, 12)], [0, 1], {}, idx, affinity=False)
    assert r4.cached_blocks == 0 and r4.source is None


# ---- 7. config ---------------------------------------------------------------------------------
@pytest.mark.parametrize("section,field", [
    ({"remote": "bogus"}, "prefix_cache.remote"),
    ({"balance_threshold": 0.5}, "prefix_cache.balance_threshold"),
    ({"overlap_weight": -1}, "prefix_cache.overlap_weight"),
    ({"min_remote_blocks": 0}, "prefix_cache.min_remote_blocks"),
    ({"enabled": "yes"}, "prefix_cache.enabled"),
    ({"no_such_key": 1}, "prefix_cache.no_such_key"),
])
def test_config_errors_name_the_field(section, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config({"prefix_cache": section})


def test_config_defaults_and_values():
    c = load_config({"prefix_cache": {"remote": "lease", "overlap_weight": 0,
                                      "balance_threshold": 2}})
    assert c.prefix_cache.remote == "lease" and c.prefix_cache.overlap_weight == 0.0
    assert c.prefix_cache.balance_threshold == 2.0 and c.prefix_cache.enabled
    d = load_config(None).prefix_cache
    assert (d.enabled, d.routing, d.remote, d.min_remote_blocks) == (True, True, "auto", 2)
