"""ElasticMoE across nodes: a replica on a new node copies the weights from a peer node's store
(never from disk); a node that served before maps its kept copy; with no room in the cluster,
the elastic manager asks Ray's autoscaler, whose fake multi-node provider adds a node."""

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import fabric  # noqa: E402

CFG = {"model": {"preset": "tiny-moe"},
       "instances": {"count": 1, "kv_blocks": 24, "block_size": 8, "num_cpus": 1}}


def prompts(n, seed):
    import random

    rng = random.Random(seed)
    return [[rng.randrange(3, 300) for _ in range(rng.randrange(10, 50))] for _ in range(n)]


def test_new_node_copies_from_peer_and_reuses_its_copy_later():
    c = Cluster()
    c.add_node(num_cpus=0)                    # head: driver, controller, manager
    first = c.add_node(num_cpus=1)
    ray.init(address=c.address, namespace="kv-fabric")
    try:
        fab = fabric.start(CFG)
        try:
            batch = prompts(4, seed=1)
            ref = [r.tokens for r in fab.generate(batch, max_new_tokens=20, ignore_eos=True)]
            start = fab.stats()["elastic"]["start"]
            second = c.add_node(num_cpus=1)
            c.wait_for_nodes()
            up = fab.scale(2)
            nodes = {s["node"] for s in fab.stats()["instances"]}
            assert nodes == {first.node_id, second.node_id}
            # the second node had no copy: pulled from the first node's store, not from disk
            assert up["bytes_copied"] == start["bytes_mapped"] and up["bytes_loaded_from_disk"] == 0
            assert up["bytes_mapped"] == start["bytes_mapped"] and up["weights_shared"]
            assert [r.tokens for r in fab.generate(batch, max_new_tokens=20, ignore_eos=True)] == ref
            fab.scale(1)
            again = fab.scale(2)                  # the second node kept its store: map only
            assert again["bytes_copied"] == 0 and again["bytes_loaded_from_disk"] == 0
            assert [r.tokens for r in fab.generate(batch, max_new_tokens=20, ignore_eos=True)] == ref
        finally:
            fab.shutdown()
    finally:
        ray.shutdown()
        c.shutdown()


def test_nodes_publish_side_by_side_and_read_the_weights_once():
    """Three nodes starting at once: one node's store makes the weights, the other two copy
    that copy (they wait for it rather than make their own), and every replica maps its own
    node's copy."""
    c = Cluster()
    c.add_node(num_cpus=0)                    # head: driver, controller, manager
    nodes = [c.add_node(num_cpus=1) for _ in range(3)]
    ray.init(address=c.address, namespace="kv-fabric")
    try:
        cfg = {**CFG, "instances": {**CFG["instances"], "count": 3, "standbys": 0}}
        with fabric.start(cfg) as fab:
            stats = fab.stats()
            assert {s["node"] for s in stats["instances"]} == {n.node_id for n in nodes}
            stores = stats["elastic"]["weight_stores"]
            assert set(stores) == {n.node_id for n in nodes}
            made = [n for n, c in stores.items() if c["bytes_copied"] == 0]
            assert len(made) == 1, stores
            start = stats["elastic"]["start"]
            per_node = start["bytes_mapped"] // 3
            assert all(c["bytes_copied"] == per_node for n, c in stores.items() if n not in made)
            assert start["bytes_copied"] == 2 * per_node and start["weights_shared"]
            batch = prompts(3, seed=3)
            out = fab.generate(batch + batch, max_new_tokens=12, ignore_eos=True)
            assert [r.tokens for r in out[:3]] == [r.tokens for r in out[3:]]
    finally:
        ray.shutdown()
        c.shutdown()


def test_no_room_asks_rays_autoscaler_for_a_node():
    from autoscaling_cluster import autoscaling_cluster

    with autoscaling_cluster(head_cpus=1, worker_cpus=1, max_workers=2) as address:
        fab = fabric.start(CFG, address=address)     # one replica: the head's only CPU
        try:
            batch = prompts(3, seed=2)
            ref = [r.tokens for r in fab.generate(batch, max_new_tokens=16, ignore_eos=True)]
            assert len(ray.nodes()) == 1
            up = fab.scale(2)                        # no room: the manager asks the autoscaler
            elastic = fab.stats()["elastic"]
            assert elastic["resources_requested"] == 2
            assert (up["from"], up["to"]) == (1, 2)
            assert len([n for n in ray.nodes() if n["Alive"]]) == 2
            assert len({s["node"] for s in fab.stats()["instances"]}) == 2
            assert up["bytes_copied"] > 0 and up["bytes_loaded_from_disk"] == 0
            assert [r.tokens for r in fab.generate(batch, max_new_tokens=16, ignore_eos=True)] == ref
            fab.scale(1)
            assert fab.stats()["elastic"]["resources_requested"] == 1
        finally:
            fab.shutdown()
            ray.shutdown()
