"""KV tiers on a real Ray fabric: evicted prefix blocks go down to the node's host tier and
disk tier and come back up (load, compute-or-load) with the reference's tokens; the host tier
outlives a killed instance; a corrupt file, a full disk, a removed directory and a killed node
holding host-tier blocks (in tests/test_faults.py) all end in correct tokens (recompute),
nothing hangs; sessions with a
time-to-live through `generate` and the stats.

The reference is an in-process `Engine` with the cache off over the fabric's model (preset
tiny-llama, seed 0). No test asserts how long anything took."""

import os
import random
import shutil

import pytest

ray = pytest.importorskip("ray")

import fabric  # noqa: E402
from tests.test_prefix_fabric import local_ray, reference, toks, wait_until  # noqa: E402,F401

BS = 8
BLOCK_BYTES = 2 * 2 * BS * 2 * 32 * 4      # tiny-llama: 2 layers, 2 KV heads of 32, float32


def config(tmp_path, prefill="auto", host_blocks=64, disk=True, **inst):
    return {"instances": {"count": 1, "kv_blocks": 24, "block_size": BS, "max_batch_tokens": 32,
                          **inst},
            "tiers": {"host_bytes": host_blocks * BLOCK_BYTES,
                      "disk_path": str(tmp_path) if disk else None,
                      "disk_bytes": 512 * BLOCK_BYTES if disk else 0, "prefill": prefill}}


def push_out(fab, rng, prompt, rounds=3):
    """Run other prompts until `prompt`'s blocks have left the pool (into the tiers)."""
    for _ in range(rounds):
        fab.generate([toks(rng, BS * 9) for _ in range(2)], max_new_tokens=2, ignore_eos=True)


def tiers(fab) -> dict:
    return fab.stats()["tiers"]


@pytest.mark.parametrize("prefill", ["load", "compute_or_load", "auto"])
def test_blocks_come_back_from_the_host_tier(local_ray, reference, tmp_path, prefill):
    rng = random.Random(301)
    fab = fabric.start(config(tmp_path, prefill))
    try:
        prompt = toks(rng, BS * 10 + 3)
        (first,) = fab.generate([prompt], max_new_tokens=6, ignore_eos=True)
        assert first.tokens == reference([prompt], 6)[0]
        push_out(fab, rng, prompt)
        assert wait_until(lambda: tiers(fab)["host"]["blocks"] >= 10)
        (again,) = fab.generate([prompt], max_new_tokens=6, ignore_eos=True)
        assert again.tokens == first.tokens
        m = again.metrics
        assert m["tier_policy"] in ("load", "compute_or_load", "recompute")
        if prefill != "auto":
            assert m["tier_policy"] == prefill
            assert m["tier_loaded_tokens"] + m["tier_computed_tokens"] == 10 * BS
        if prefill == "load":                 # the prefill waits: all of them come up
            assert m["tier_loaded_tokens"] == 10 * BS
        t = tiers(fab)
        assert t["enabled"] and t["blocks_down"] >= 10
        if m["tier_loaded_tokens"]:
            assert t["host"]["hits"] > 0 and t["host"]["bytes_up"] > 0 and t["loaded_tokens"] > 0
        assert wait_until(lambda: fab.stats()["tiers"]["index_blocks"].get("host", 0) >= 10)
    finally:
        fab.shutdown()


def test_disk_tier_corrupt_full_and_removed(local_ray, reference, tmp_path):
    """A host tier of 2 blocks: the rest go down to disk. Then the files are damaged, the
    disk fills, the directory goes away: every answer still equals the reference."""
    rng = random.Random(302)
    fab = fabric.start(config(tmp_path, "load", host_blocks=2))
    try:
        prompts = [toks(rng, BS * 8 + 1) for _ in range(3)]
        refs = reference(prompts, 5)
        for p in prompts:
            fab.generate([p], max_new_tokens=5, ignore_eos=True)
        push_out(fab, rng, prompts[0])
        assert wait_until(lambda: tiers(fab)["disk"]["blocks"] >= 16)
        (node_dir,) = [os.path.join(tmp_path, d) for d in os.listdir(tmp_path)]
        # 1. from disk, intact
        (r,) = fab.generate([prompts[0]], max_new_tokens=5, ignore_eos=True)
        assert r.tokens == refs[0] and r.metrics["tier_loaded_tokens"] > 0
        assert tiers(fab)["disk"]["hits"] > 0
        # 2. every file of the disk tier damaged: a miss, never wrong KV
        for name in os.listdir(node_dir):
            with open(os.path.join(node_dir, name), "r+b") as f:
                f.seek(-5, os.SEEK_END)
                f.write(b"\xff\x00\xff\x00\xff")
        (r,) = fab.generate([prompts[1]], max_new_tokens=5, ignore_eos=True)
        assert r.tokens == refs[1]
        assert tiers(fab)["disk"]["errors"]["corrupt"] >= 1
        # 3. the disk is full: evicted blocks are not written, requests still answer
        (store,) = [ray.get_actor(a["name"], namespace=a["namespace"])
                    for a in ray.util.list_named_actors(all_namespaces=True) if "tiers-" in a["name"]]
        ray.get(store.inject_fault.remote("disk_full", 10_000))
        push_out(fab, rng, prompts[2])
        assert wait_until(lambda: tiers(fab)["disk"]["errors"]["write_failed"] > 0)
        (r,) = fab.generate([prompts[2]], max_new_tokens=5, ignore_eos=True)
        assert r.tokens == refs[2]
        ray.get(store.inject_fault.remote("disk_full", 0))
        # 4. the directory is removed under the running tier
        shutil.rmtree(node_dir)
        (r,) = fab.generate([prompts[0]], max_new_tokens=5, ignore_eos=True)
        assert r.tokens == refs[0]
        push_out(fab, rng, prompts[0])
        assert wait_until(lambda: os.path.isdir(node_dir) and os.listdir(node_dir))
        assert fab.generate([prompts[1]], max_new_tokens=5, ignore_eos=True)[0].tokens == refs[1]
    finally:
        fab.shutdown()


def test_host_tier_outlives_a_killed_instance(local_ray, reference, tmp_path):
    rng = random.Random(303)
    fab = fabric.start(config(tmp_path, "load", disk=False))
    try:
        prompt = toks(rng, BS * 8 + 2)
        fab.generate([prompt], max_new_tokens=4, ignore_eos=True)
        push_out(fab, rng, prompt)
        assert wait_until(lambda: tiers(fab)["host"]["blocks"] >= 8)
        ray.kill(fab.instances[0], no_restart=True)
        assert wait_until(lambda: fab.stats()["elastic"]["replaced"] >= 1, 300)
        (r,) = fab.generate([prompt], max_new_tokens=4, ignore_eos=True)
        assert r.tokens == reference([prompt], 4)[0]
        assert r.metrics["tier_loaded_tokens"] >= 8 * BS      # the new instance found them
    finally:
        fab.shutdown()


def test_sessions_keep_kv_between_turns(local_ray, reference):
    rng = random.Random(304)
    fab = fabric.start({"instances": {"count": 1, "kv_blocks": 24, "block_size": BS}})
    try:
        turn1 = toks(rng, BS * 6 + 3)
        (a,) = fab.generate([turn1], max_new_tokens=4, ignore_eos=True, session_id="u1", ttl_s=120)
        per = fab.stats()["prefix_cache"]["instances"]
        assert sum(p["sessions"] for p in per.values()) == 1
        fab.generate([toks(rng, BS * 9)], max_new_tokens=2, ignore_eos=True)    # other traffic
        turn2 = turn1 + a.tokens + toks(rng, 4)
        (b,) = fab.generate([turn2], max_new_tokens=4, ignore_eos=True, session_id="u1")
        assert b.tokens == reference([turn2], 4)[0] and b.metrics["cached_tokens"] >= 6 * BS
        with pytest.raises(fabric.RequestError, match="ttl_s"):
            fab.generate([turn1], max_new_tokens=2, session_id="u1", ttl_s=-3)
        with pytest.raises(fabric.RequestError, match="session_id"):
            fab.generate([turn1], max_new_tokens=2, ttl_s=3)
        assert fab.generate([turn1], max_new_tokens=2)[0].tokens       # still serving
    finally:
        fab.shutdown()
