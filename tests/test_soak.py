"""A bounded soak of an embedded fabric: 16 client threads send 771 mixed requests (short,
medium and long prompts, the long ones bigger than one instance's pool so that lending runs;
greedy and seeded sampling; `generate`, `submit` and `stream`, some streams left early) to three
small CPU instances. Checks: every request answered, the same greedy (and seeded) request always
gives the same tokens, every pool fully free again within seconds (nothing lent, nothing
borrowed), borrowing happened, and the instance processes' memory stays flat.

Long requests run concurrently, so several instances borrow at once. When an instance kept
borrowed spare blocks for a request that could not start yet (and so lent nothing, being a
debtor), this deadlocked within seconds (797e937; fixed in 86f9be7).
`test_concurrent_long_requests_do_not_deadlock` is that case alone, and `Stalled` turns any
such hang into a failure that shows every instance's books.

Figures are printed (run with `pytest -s`) and written to bench/results/soak.json.
"""

import json
import os
import platform
import random
import threading
import time

import pytest

ray = pytest.importorskip("ray")
import fabric

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "bench", "results", "soak.json")

KV_BLOCKS, BLOCK_SIZE = 24, 16       # 384 tokens of KV per instance
POOL_TOKENS = KV_BLOCKS * BLOCK_SIZE
CONFIG = {"instances": {"count": 3, "kv_blocks": KV_BLOCKS, "block_size": BLOCK_SIZE,
                        "max_num_seqs": 16, "max_batch_tokens": 128},
          "lending": {"enabled": True}}
THREADS = 16
CALLS_PER_THREAD = 24                # ~2 requests a call: 16 * 24 calls -> 771 requests
MIN_REQUESTS = 500
SOAK_LIMIT_S = 600                   # the whole soak; past this it hangs: fail
STALL_S = 60.0                       # no answer at all for this long while requests wait: stalled
FREE_WITHIN_S = 60.0                 # every pool fully free by then after the last answer
RSS_GROWTH_LIMIT_MB = 50.0           # per instance process, warm-up to end (see the test)

# The determinism probes: sent over and over by every thread, beside everything else.
FIXED_GREEDY = [(7 * i + 3) % 256 for i in range(40)]
FIXED_LONG = [(11 * i + 5) % 256 for i in range(450)]           # > one pool: borrows
FIXED_SAMPLED = {"prompt": [(5 * i + 1) % 256 for i in range(25)], "max_new_tokens": 12,
                 "temperature": 0.8, "seed": 1234, "ignore_eos": True}


class Stalled(AssertionError):
    """No request was answered for STALL_S seconds while some were outstanding."""


# ---- processes and memory ----------------------------------------------------------------------
def instance_pids(fab) -> list[int]:
    """PIDs of this fabric's instance actors, from the GCS actor table (needs no dashboard)."""
    from ray._private import state

    names = set(fab.names)
    pids = [a["Pid"] for a in state.actors().values()
            if a["Name"] in names and a["State"] == "ALIVE"]
    assert len(pids) == len(names), f"found {pids} for {sorted(names)}"
    return sorted(pids)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


class RssSampler(threading.Thread):
    """Samples the RSS of `pids` every `period_s` until stopped (the curve, for the report)."""

    def __init__(self, pids: list[int], period_s: float = 2.0):
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.samples: list[tuple[float, list[float]]] = []
        self.stop = threading.Event()
        self.t0 = time.perf_counter()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((round(time.perf_counter() - self.t0, 1),
                                 [round(rss_mb(p), 1) for p in self.pids]))
            self.stop.wait(self.period_s)


# ---- the workload --------------------------------------------------------------------------------
def random_prompt_of(rng: random.Random, lo: int, hi: int) -> list[int]:
    return [rng.randrange(256) for _ in range(rng.randint(lo, hi))]


def random_prompt(rng: random.Random) -> list[int]:
    kind = rng.random()
    if kind < 0.40:
        return random_prompt_of(rng, 1, 32)                  # short
    if kind < 0.75:
        return random_prompt_of(rng, 33, 200)                # medium
    return random_prompt_of(rng, POOL_TOKENS + 16, 700)      # long: more than one pool holds


def random_request(rng: random.Random, name: str) -> dict:
    req = {"id": name, "prompt": random_prompt(rng),
           "max_new_tokens": rng.choice([1, 4, 8, 16, 24, 32]), "ignore_eos": rng.random() < 0.5}
    if rng.random() < 0.3:
        req.update(temperature=rng.choice([0.5, 0.8, 1.2]), seed=rng.randrange(1 << 30))
    return req


def plan(thread: int) -> list[tuple]:
    """The calls of one client thread, fixed by its seed: ("generate", prompts, kwargs),
    ("submit", requests), ("stream", request, stop_after or None) or ("probe", which)."""
    rng = random.Random(1000 + thread)
    calls = []
    for c in range(CALLS_PER_THREAD):
        name = f"t{thread}-c{c}"
        kind = rng.random()
        if kind < 0.40:
            k = rng.randint(1, 3)
            temp = rng.choice([0.0, 0.0, 0.7])
            kw = {"max_new_tokens": rng.choice([2, 8, 16, 32]), "temperature": temp,
                  "seed": rng.randrange(1000) if temp else None, "ignore_eos": rng.random() < 0.5}
            calls.append(("generate", [random_prompt(rng) for _ in range(k)], kw))
        elif kind < 0.70:
            calls.append(("submit", [random_request(rng, f"{name}-{j}")
                                     for j in range(rng.randint(2, 4))]))
        elif kind < 0.85:
            req = random_request(rng, name)
            req["max_new_tokens"] = max(req["max_new_tokens"], 8)
            stop_after = rng.choice([None, None, None, 2])       # a quarter leave early
            calls.append(("stream", req, stop_after))
        else:
            calls.append(("probe", rng.choice(["greedy", "greedy", "long", "sampled"])))
    return calls


def num_requests(calls: list[tuple]) -> int:
    return sum(len(c[1]) if c[0] in ("generate", "submit") else 1 for c in calls)


def run_probe(fab, which: str) -> list[int]:
    if which == "greedy":
        return fab.generate([FIXED_GREEDY], max_new_tokens=16, ignore_eos=True)[0].tokens
    if which == "long":
        return fab.generate([FIXED_LONG], max_new_tokens=8, ignore_eos=True)[0].tokens
    return fab.submit([dict(FIXED_SAMPLED)])[0].tokens


CLIENTS: list[threading.Thread] = []   # every client started, joined by the `fab` fixture


class Client(threading.Thread):
    def __init__(self, fab, thread: int, calls: list[tuple]):
        super().__init__(daemon=True, name=f"soak-client-{thread}")
        CLIENTS.append(self)
        self.fab, self.calls = fab, calls
        self.answered = self.cancelled = self.tokens = 0
        self.last_answer = time.perf_counter()
        self.probes: list[tuple[str, list[int]]] = []
        self.failures: list[str] = []

    def run(self) -> None:
        for i, call in enumerate(self.calls):
            try:
                self.one(call)
            except Exception as e:                       # noqa: BLE001 - every failure counts
                self.failures.append(f"{self.name} call {i} ({call[0]}): {type(e).__name__}: {e}")

    def answer(self, n_tokens: int) -> None:
        self.answered += 1
        self.tokens += n_tokens
        self.last_answer = time.perf_counter()

    def check(self, res, max_new: int, what: str) -> None:
        if res.error is not None or res.finish_reason not in ("length", "stop") \
                or not 1 <= len(res.tokens) <= max_new \
                or (res.finish_reason == "length" and len(res.tokens) != max_new):
            self.failures.append(f"{what}: {res!r}")
            return
        self.answer(len(res.tokens))

    def one(self, call: tuple) -> None:
        kind = call[0]
        if kind == "generate":
            _, prompts, kw = call
            results = self.fab.generate(prompts, **kw)
            assert len(results) == len(prompts)
            for r in results:
                self.check(r, kw["max_new_tokens"], "generate")
        elif kind == "submit":
            reqs = call[1]
            results = self.fab.submit(reqs)
            assert [r.request_id for r in results] == [r["id"] for r in reqs]
            for req, r in zip(reqs, results):
                self.check(r, req["max_new_tokens"], "submit")
        elif kind == "stream":
            _, req, stop_after = call
            toks = []
            it = self.fab.stream(req["prompt"], max_new_tokens=req["max_new_tokens"],
                                 temperature=req.get("temperature", 0.0), seed=req.get("seed"),
                                 ignore_eos=req["ignore_eos"], request_id=req["id"])
            for tok in it:
                toks.append(tok)
                if stop_after is not None and len(toks) >= stop_after:
                    break
            it.close()                                   # leaving early cancels
            if stop_after is not None and len(toks) == stop_after:
                self.cancelled += 1
            elif not 1 <= len(toks) <= req["max_new_tokens"] or \
                    (req["ignore_eos"] and len(toks) != req["max_new_tokens"]):
                self.failures.append(f"stream {req['id']}: {len(toks)} tokens")
                return
            self.answer(len(toks))
        else:
            self.probes.append((call[1], run_probe(self.fab, call[1])))
            self.answer(len(self.probes[-1][1]))


# ---- running and checking ------------------------------------------------------------------------
def books(fab) -> list[dict]:
    return [{k: s[k] for k in ("id", "blocks_total", "blocks_free", "blocks_lent", "blocks_borrowed")}
            | {k: s["detail"][k] for k in ("num_running", "num_waiting")}
            for s in fab.stats()["instances"]]


def all_free(rows: list[dict]) -> bool:
    return all(r["blocks_free"] == r["blocks_total"] and r["blocks_lent"] == 0
               and r["blocks_borrowed"] == 0 and r["num_running"] == 0 and r["num_waiting"] == 0
               for r in rows)


def wait_all_free(fab, limit_s: float) -> tuple[bool, float, list[dict]]:
    t0 = time.perf_counter()
    while True:
        rows = books(fab)
        waited = time.perf_counter() - t0
        if all_free(rows) or waited > limit_s:
            return all_free(rows), waited, rows
        time.sleep(0.05)


def run_clients(fab, clients: list[Client], limit_s: float) -> float:
    """Run the clients to the end; `Stalled` when none answers for STALL_S seconds while some
    still wait, AssertionError past `limit_s`. Returns the seconds taken."""
    t0 = time.perf_counter()
    for c in clients:
        c.start()
    while any(c.is_alive() for c in clients):
        time.sleep(0.5)
        now = time.perf_counter()
        last = max(c.last_answer for c in clients)
        if now - max(last, t0) > STALL_S:
            answered = sum(c.answered for c in clients)
            raise Stalled(f"no request answered for {STALL_S:.0f} s ({answered} answered, "
                          f"{sum(c.is_alive() for c in clients)} clients waiting); "
                          f"books: {books(fab)}")
        assert now - t0 < limit_s, f"clients still running after {limit_s} s"
    return time.perf_counter() - t0


def write_figures(figures: dict) -> None:
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    data = {"benchmark": "soak", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": platform.machine(), "cpus": os.cpu_count(), "config": CONFIG} | figures
    with open(RESULTS, "w") as f:
        json.dump(data, f, indent=1)


# ---- the tests ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def fab(cluster):
    """A fresh fabric per test (a stalled one is not reused). Ray itself stays up for the module:
    shutting Ray down under client threads still blocked in it can abort the process."""
    f = fabric.start(CONFIG)
    yield f
    f.shutdown()                      # killed actors fail the calls clients still wait on
    for c in CLIENTS:
        c.join(30)
    alive = [c.name for c in CLIENTS if c.is_alive()]
    CLIENTS.clear()
    assert not alive, f"client threads still blocked after shutdown: {alive}"


def test_soak(fab):
    assert fab.max_request_blocks > KV_BLOCKS, "lending must let a request outgrow one pool"
    plans = [plan(t) for t in range(THREADS)]
    planned = sum(num_requests(p) for p in plans)
    assert planned >= MIN_REQUESTS

    # Warm-up: every kind of call once per thread, so that allocator arenas, Ray's buffers and
    # the threads of every actor exist before the first memory reading.
    reference = {w: run_probe(fab, w) for w in ("greedy", "long", "sampled")}
    warm = [Client(fab, t, plan(100 + t)[:4] + [("probe", "long")]) for t in range(THREADS)]
    run_clients(fab, warm, SOAK_LIMIT_S)
    assert not [f for c in warm for f in c.failures], [f for c in warm for f in c.failures][:5]
    ok, _, rows = wait_all_free(fab, FREE_WITHIN_S)
    assert ok, rows
    pids = instance_pids(fab)
    rss_before = [rss_mb(p) for p in pids]
    stats_before = fab.stats()["lending"]

    sampler = RssSampler(pids)
    sampler.start()
    clients = [Client(fab, t, p) for t, p in enumerate(plans)]
    try:
        seconds = run_clients(fab, clients, SOAK_LIMIT_S)
    except Stalled as e:
        write_figures({"stalled": str(e)})
        raise
    finally:
        sampler.stop.set()
    freed, free_after_s, rows = wait_all_free(fab, FREE_WITHIN_S)
    sampler.join()
    rss_after = [rss_mb(p) for p in pids]
    lending = fab.stats()["lending"]

    failures = [f for c in clients for f in c.failures]
    answered = sum(c.answered for c in clients)
    tokens = sum(c.tokens for c in clients)
    probes = [p for c in clients for p in c.probes]
    figures = {
        "threads": THREADS,
        "requests_planned": planned, "requests_answered": answered,
        "streams_left_early": sum(c.cancelled for c in clients),
        "determinism_probes": len(probes),
        "failures": len(failures),
        "seconds": round(seconds, 2),
        "requests_per_s": round(answered / seconds, 1),
        "generated_tokens": tokens, "tokens_per_s": round(tokens / seconds, 1),
        "borrow_events": lending["borrow_events"] - stats_before["borrow_events"],
        "blocks_borrowed": lending["blocks_borrowed_total"] - stats_before["blocks_borrowed_total"],
        "pools_free_after_s": round(free_after_s, 2),
        "rss_mb_before": [round(x, 1) for x in rss_before],
        "rss_mb_after": [round(x, 1) for x in rss_after],
        "rss_growth_mb": [round(a - b, 1) for a, b in zip(rss_after, rss_before)],
        "rss_samples": sampler.samples,
    }
    write_figures(figures)
    print(f"\n[soak] {answered}/{planned} requests answered "
          f"({figures['streams_left_early']} streams left early, {len(probes)} determinism "
          f"probes) from {THREADS} threads in {seconds:.1f} s: {figures['requests_per_s']} req/s, "
          f"{tokens} tokens, {figures['tokens_per_s']} tokens/s")
    print(f"[soak] borrow events {figures['borrow_events']} "
          f"({figures['blocks_borrowed']} blocks); pools fully free {free_after_s:.2f} s after "
          f"the last answer")
    print(f"[soak] instance RSS MB before {figures['rss_mb_before']} after "
          f"{figures['rss_mb_after']} growth {figures['rss_growth_mb']}; "
          f"written to {os.path.relpath(RESULTS, ROOT)}")

    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:5]}"
    assert answered == planned >= MIN_REQUESTS
    for which, toks in probes:
        assert toks == reference[which], f"{which} probe gave {toks}, expected {reference[which]}"
    assert {w for w, _ in probes} == set(reference), "every probe kind should have run"
    assert freed, f"blocks leaked: {rows}"
    assert figures["borrow_events"] > 0, "the long prompts should have borrowed"
    # Flat memory. The KV pools are allocated once at start and per-request state (sequences,
    # block tables, waiters) is dropped when a request ends, so after the warm-up nothing should
    # grow with the number of requests. 50 MB is well above the noise seen here (allocator
    # arenas and Ray's buffers settling: a few MB) and below what one leaked activation per step
    # (>= 32 KB for a 128-token chunk of tiny-llama, thousands of steps) or ~80 KB leaked per
    # request (771 requests) would add.
    for pid, growth in zip(pids, figures["rss_growth_mb"]):
        assert growth < RSS_GROWTH_LIMIT_MB, f"instance pid {pid} grew by {growth} MB"


def test_concurrent_long_requests_do_not_deadlock(fab):
    """The deadlock on its own: 8 threads each send long requests (400-700 prompt tokens + 32
    new: 26-46 blocks, more than one pool) one after another. About 8 s here; at 797e937
    (spares held while waiting) it stalled after 9 of the 48 answers."""
    calls = [[("generate", [random_prompt_of(random.Random(100 * t + c), POOL_TOKENS + 16, 700)],
               {"max_new_tokens": 32, "ignore_eos": True}) for c in range(6)] for t in range(8)]
    clients = [Client(fab, t, c) for t, c in enumerate(calls)]
    run_clients(fab, clients, SOAK_LIMIT_S)
    assert not [f for c in clients for f in c.failures]
    assert sum(c.answered for c in clients) == 48
    ok, _, rows = wait_all_free(fab, FREE_WITHIN_S)
    assert ok, rows
