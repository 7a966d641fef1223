"""Start-up that holds on a slow machine: instances whose constructor takes 30 s (as a real
checkpoint on a busy node does) start and serve, on one node and on a 3-node cluster; no watchdog
judges a rank before it has lived. Only `instances.startup_timeout_s` ends a start, with a
`FabricError` that names the rank, its node and what it was doing.

The delay is injected with the instance actor's testing setting KV_FABRIC_TESTING_STARTUP_DELAY_S
(read in the actor's process: set before the Ray nodes start, they pass it on to their workers)."""

import os

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import fabric  # noqa: E402
from actors.instance import STARTUP_DELAY_ENV  # noqa: E402

DELAY_S = 30
CONFIG = {"instances": {"count": 2, "kv_blocks": 12, "block_size": 8, "max_batch_tokens": 32}}
PROMPT = list(range(3, 120))          # 117 + 20 tokens = 18 blocks: more than one instance holds


@pytest.fixture
def startup_delay(monkeypatch):
    def set_delay(seconds: float):
        monkeypatch.setenv(STARTUP_DELAY_ENV, str(seconds))
    yield set_delay
    os.environ.pop(STARTUP_DELAY_ENV, None)


@pytest.fixture(scope="module")
def reference() -> list[int]:
    """The same request on one in-process engine with room for all of its KV."""
    import torch

    from fabric.engine import Engine
    from fabric.model import load_model
    from fabric.sequence import SamplingParams

    with torch.no_grad():
        engine = Engine(load_model("tiny-llama"), kv_blocks=64, block_size=8)
        (seq,) = engine.generate([PROMPT], SamplingParams(max_new_tokens=20, ignore_eos=True))
    return seq.output


def check_serves(fab, reference: list[int]) -> None:
    (res,) = fab.generate([PROMPT], max_new_tokens=20, ignore_eos=True)
    assert res.tokens == reference
    stats = fab.stats()
    assert stats["lending"]["borrow_events"] >= 1, "the request should span two instances"
    assert stats["elastic"]["dead"] == [] and stats["elastic"]["replaced"] == 0
    assert stats["elastic"]["start"]["seconds"] >= DELAY_S, "the delay should have happened"


def test_slow_instances_start_and_serve_embedded(startup_delay, reference):
    startup_delay(DELAY_S)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="kv-fabric")
    try:
        with fabric.start(CONFIG) as fab:
            check_serves(fab, reference)
    finally:
        ray.shutdown()


def test_slow_instances_start_and_serve_on_three_nodes(startup_delay, reference):
    startup_delay(DELAY_S)
    c = Cluster()
    c.add_node(num_cpus=0)                             # head: driver, controller, manager
    for _ in range(3):
        c.add_node(num_cpus=1)
    ray.init(address=c.address, namespace="kv-fabric")
    try:
        with fabric.start(CONFIG | {"instances": CONFIG["instances"] | {"count": 3}}) as fab:
            assert len({s["node"] for s in fab.stats()["instances"]}) == 3
            check_serves(fab, reference)
    finally:
        ray.shutdown()
        c.shutdown()


def test_startup_timeout_names_rank_node_and_phase(startup_delay):
    startup_delay(600)
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             namespace="kv-fabric")
    try:
        cfg = {"instances": {"count": 1, "kv_blocks": 8, "startup_timeout_s": 2}}
        with pytest.raises(fabric.FabricError) as err:
            fabric.start(cfg)
        msg = str(err.value)
        assert "rank 0" in msg and "instances.startup_timeout_s" in msg, msg
        assert ray.get_runtime_context().get_node_id() in msg, msg       # its node
        assert STARTUP_DELAY_ENV in msg, msg                              # what it was doing
    finally:
        ray.shutdown()
