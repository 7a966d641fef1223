"""Faults on a real multi-node Ray cluster: a node holding lent KV is removed mid-generation, a
request's home instance is killed, the controller is killed. No request is lost and the tokens
equal a fault-free run. The elastic manager (the owner of membership) notices a lost replica
even when no request touches it, and replaces it when the cluster has room."""

import threading
import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import fabric  # noqa: E402

# these tests choose each request's home (`_next_home`): round robin, not cache-aware routing
CONFIG = {"instances": {"count": 3, "kv_blocks": 12, "block_size": 8, "max_batch_tokens": 32},
          "prefix_cache": {"routing": False}}
PROMPT = list(range(3, 120))          # 117 + 30 tokens = 19 blocks: home 12 + 7 borrowed


@pytest.fixture
def cluster():
    c = Cluster()
    c.add_node(num_cpus=0)                           # head: the driver and the controller
    nodes = [c.add_node(num_cpus=1) for _ in range(3)]   # one instance each
    ray.init(address=c.address, namespace="kv-fabric")
    yield c, nodes
    ray.shutdown()
    c.shutdown()


def start(c):
    return fabric.start(CONFIG)


def wait_for(pred, timeout_s=60.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_lender_node_removed_mid_generation(cluster):
    c, nodes = cluster
    fab = start(c)
    (ref,) = fab.generate([PROMPT], max_new_tokens=30, ignore_eos=True)
    stream = fab.stream(PROMPT, max_new_tokens=30, ignore_eos=True)
    got = [next(stream) for _ in range(3)]
    lenders = [s for s in fab.stats()["instances"] if s["blocks_lent"] > 0]
    assert lenders, "the request should be borrowing"
    victim = next(n for n in nodes if n.node_id == lenders[0]["node"])
    c.remove_node(victim)
    got += list(stream)                               # resumes: lost KV recomputed
    assert got == ref.tokens
    stats = fab.stats()
    assert sum(s["detail"]["recoveries"] for s in stats["instances"]) >= 1
    assert wait_for(lambda: all(s["blocks_free"] == s["blocks_total"]
                                for s in fab.stats()["instances"]))
    (again,) = fab.generate([PROMPT[:50]], max_new_tokens=5, ignore_eos=True)
    assert len(again.tokens) == 5
    fab.shutdown()


def test_home_killed_and_controller_killed(cluster):
    c, _ = cluster
    fab = start(c)
    prompts = [PROMPT, PROMPT[:40], PROMPT[:70]]
    refs = fab.generate(prompts, max_new_tokens=20, ignore_eos=True)

    after_home_kill, after_controller_kill = {}, {}
    worker = threading.Thread(target=lambda: after_home_kill.update(
        r=fab.generate(prompts, max_new_tokens=20, ignore_eos=True)))
    fab._next_home = 0
    worker.start()
    assert wait_for(lambda: fab.stats()["instances"][0]["detail"]["num_running"] > 0, 60)
    ray.kill(fab.instances[0])                          # the home of prompts[0]
    worker.join(300)
    assert not worker.is_alive()
    assert [r.tokens for r in after_home_kill["r"]] == [r.tokens for r in refs]

    worker = threading.Thread(target=lambda: after_controller_kill.update(
        r=fab.generate(prompts, max_new_tokens=20, ignore_eos=True)))
    worker.start()
    time.sleep(0.2)
    ray.kill(fab.controller, no_restart=False)          # Ray restarts it; heartbeats rebuild it
    worker.join(300)
    assert not worker.is_alive()
    assert [r.tokens for r in after_controller_kill["r"]] == [r.tokens for r in refs]
    # every live rank beats to the restarted controller: the two that lived on, and the killed
    # one's replacement once the manager has brought it up (a warm standby may already have)
    def beating_are_the_live_ranks():
        ledger = {r["id"] for r in ray.get(fab.controller.stats.remote())["ledger"]["instances"]}
        el = fab.stats()["elastic"]
        live = set(range(el["replicas"])) - set(el["dead"])
        return ledger == live and len(live) >= 2

    assert wait_for(beating_are_the_live_ranks, 60), (
        ray.get(fab.controller.stats.remote())["ledger"]["instances"], fab.stats()["elastic"])
    (long,) = fab.generate([PROMPT], max_new_tokens=20, ignore_eos=True)   # borrows again
    assert long.tokens == refs[0].tokens
    fab.shutdown()


def test_idle_instance_loss_noticed_by_the_manager(cluster):
    c, nodes = cluster
    fab = start(c)
    idle = fab.stats()["instances"][2]
    victim = next(n for n in nodes if n.node_id == idle["node"])
    t0 = time.time()
    c.remove_node(victim)
    assert wait_for(lambda: idle["id"] in fab.stats()["elastic"]["dead"], 120)
    print(f"the elastic manager noticed the loss in {time.time() - t0:.1f} s")
    ledger = ray.get(fab.controller.stats.remote())["ledger"]
    assert idle["id"] in ledger["removed"]
    assert idle["id"] not in [row["id"] for row in ledger["instances"]]
    results = fab.generate([PROMPT[:30], PROMPT[:60], PROMPT[:10]], max_new_tokens=5)
    assert all(len(r.tokens) >= 1 for r in results)
    fab.shutdown()


def test_dead_instance_is_replaced(cluster):
    c, nodes = cluster
    c.add_node(num_cpus=1)                              # room for a replacement
    fab = start(c)
    (ref,) = fab.generate([PROMPT], max_new_tokens=10, ignore_eos=True)
    victim_stats = fab.stats()["instances"][1]
    victim = next(n for n in c.list_all_nodes() if n.node_id == victim_stats["node"])
    c.remove_node(victim)
    assert wait_for(lambda: fab.stats()["elastic"]["replaced"] == 1, 300)
    stats = fab.stats()
    assert stats["elastic"]["dead"] == []
    assert len(stats["instances"]) == 3
    assert stats["instances"][1]["node"] != victim_stats["node"]
    fab._next_home = 0
    (again,) = fab.generate([PROMPT], max_new_tokens=10, ignore_eos=True)
    assert again.tokens == ref.tokens
    assert sum(s["detail"]["remote_partials_served"] for s in fab.stats()["instances"]) > 0
    fab.shutdown()


def test_killed_node_with_host_tier_blocks(cluster):
    """The node holding a request's host-tier blocks (its instance and its tier store) dies:
    the request is answered elsewhere by recomputing, with the fault-free tokens."""
    import random

    c, nodes = cluster
    rng = random.Random(305)
    block_bytes = 2 * 2 * 8 * 2 * 32 * 4             # tiny-llama, block_size 8, float32
    fab = fabric.start({**CONFIG, "tiers": {"host_bytes": 64 * block_bytes, "prefill": "load"}})
    prompt = [rng.randrange(3, 256) for _ in range(8 * 8 + 1)]
    (r,) = fab.generate([prompt], max_new_tokens=5, ignore_eos=True)
    home = next(s for s in fab.stats()["instances"] if s["id"] == r.home)
    for _ in range(4):                                # push its blocks down to the host tier
        fab.generate([[rng.randrange(3, 256) for _ in range(8 * 9)] for _ in range(3)],
                     max_new_tokens=2, ignore_eos=True)
    assert wait_for(lambda: any((n["host"] or {}).get("blocks", 0) >= 8 and
                                n["node_id"] == home["node"]
                                for n in fab.stats()["tiers"]["nodes"]))
    c.remove_node(next(n for n in nodes if n.node_id == home["node"]))
    (r2,) = fab.generate([prompt], max_new_tokens=5, ignore_eos=True)
    assert r2.tokens == r.tokens and r2.home != r.home
    assert all(n["node_id"] != home["node"] for n in fab.stats()["tiers"]["nodes"])
    fab.shutdown()
