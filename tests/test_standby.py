"""Warm standbys and instance threads on a real embedded Ray node: a scale-up adopts the node's
ready standby (same tokens as before it), a new standby takes its place, a standby is never a
member, a dead one makes the rank start cold; an instance's torch threads follow num_cpus."""

import time

import pytest
import torch

ray = pytest.importorskip("ray")

import fabric  # noqa: E402
from fabric.config import InstancesConfig, load_config  # noqa: E402
from fabric.errors import ConfigError  # noqa: E402

# round robin (not cache-aware routing): every replica serves some of the prompts
CFG = {"instances": {"count": 1, "kv_blocks": 16, "block_size": 8, "num_cpus": 1},
       "prefix_cache": {"routing": False}}
PROMPTS = [[3 + (7 * i + j) % 250 for j in range(12 + i)] for i in range(6)]
CORES = InstancesConfig(num_cpus=64).torch_threads()     # the cores this machine gives


@pytest.fixture(scope="module")
def local_ray():
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             namespace="kv-fabric")
    yield
    ray.shutdown()


def wait_for(pred, timeout_s=600.0):     # a bound on a hang, not on speed
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def standbys(fab) -> list[dict]:
    return fab.stats()["elastic"]["standbys"]


def ready_standby(fab) -> str | None:
    return next((s["name"] for s in standbys(fab) if s["state"] == "ready"), None)


def threads(handle) -> int:
    return ray.get(handle.__ray_call__.remote(lambda self: torch.get_num_threads()))


def tokens(fab) -> list[list[int]]:
    return [r.tokens for r in fab.generate(PROMPTS, max_new_tokens=6, ignore_eos=True)]


def test_scale_up_adopts_the_standby_and_a_new_one_takes_its_place(local_ray):
    with fabric.start(CFG | {"instances": CFG["instances"] | {"num_cpus": 2}}) as fab:
        ref = tokens(fab)
        assert wait_for(lambda: ready_standby(fab) is not None)
        first = ready_standby(fab)
        assert first not in fab.names and len(fab.stats()["instances"]) == 1
        up = fab.scale(2)
        assert up["warm_replicas"] == 1, up
        assert fab.names[1] == first
        assert up["bytes_loaded_from_disk"] == 0 and up["weights_shared"], up
        assert threads(fab.instances[1]) == min(2, CORES)     # adopted with num_cpus' threads
        assert len(fab.stats()["instances"]) == 2
        assert tokens(fab) == ref
        assert wait_for(lambda: ready_standby(fab) not in (None, first))
        assert all(s["name"] not in fab.names for s in standbys(fab))


def test_a_dead_standby_is_skipped_and_replaced(local_ray):
    with fabric.start(CFG) as fab:
        ref = tokens(fab)
        assert wait_for(lambda: ready_standby(fab) is not None)
        dead = ready_standby(fab)
        ray.kill(ray.get_actor(dead, namespace="kv-fabric"))
        up = fab.scale(2)
        assert up["warm_replicas"] == 0, up
        assert dead not in fab.names
        assert tokens(fab) == ref
        assert wait_for(lambda: ready_standby(fab) not in (None, dead))


def test_torch_threads_follow_num_cpus(local_ray):
    cfg = {"instances": {"count": 1, "kv_blocks": 8, "block_size": 8, "standbys": 0}}
    for num_cpus, want in ((1, 1), (2, min(2, CORES)), (0.4, 1)):
        with fabric.start(cfg | {"instances": cfg["instances"] | {"num_cpus": num_cpus}}) as fab:
            assert threads(fab.instances[0]) == want


def test_num_cpus_default_shares_a_node():
    inst = load_config({"instances": {"count": 1}}).instances
    assert inst.num_cpus is None and inst.standbys == 1
    assert inst.cpus([2.0], 1) == 2.0                  # one instance on 2 cores: both
    assert inst.cpus([2.0], 2) == 1.0
    assert inst.cpus([2.0], 3) == 1.0                  # at least 1
    assert inst.cpus([0.0, 1.0, 1.0, 1.0], 3) == 1.0   # a head without CPUs is no node for it
    assert inst.cpus([8.0, 4.0], 4) == 2.0             # the smallest node, 2 instances each
    assert InstancesConfig(num_cpus=0.5).cpus([2.0], 1) == 0.5
    for bad in ({"num_cpus": -1}, {"num_cpus": "auto"}, {"standbys": -1}, {"standbys": 1.5}):
        with pytest.raises(ConfigError, match=f"instances.{next(iter(bad))}"):
            load_config({"instances": bad})
