"""No silent hangs, on an embedded fabric: a fault in an instance's engine loop fails the request
it was serving with a clear error and the next request is served; a creditor whose attention
handler raises (a bug) fails the requests that used it instead of recomputing them forever; a
cancelled id is forgotten when its request ends; a full queue is a clear `CapacityError`.

Faults are injected with the instance actor's testing aid `inject_fault(point)`."""

import threading

import pytest

ray = pytest.importorskip("ray")
import fabric  # noqa: E402

LONG = list(range(1, 110))          # 109 + 40 tokens = 19 blocks: more than one instance holds


@pytest.fixture(scope="module")
def fab():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    f = fabric.start({"instances": {"count": 2, "kv_blocks": 10, "block_size": 8,
                                    "max_batch_tokens": 32},
                      "prefix_cache": {"routing": False}})     # tests choose homes (_next_home)
    yield f
    f.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def reference(fab):
    (long,) = fab.generate([LONG], max_new_tokens=40, ignore_eos=True)
    (short,) = fab.generate([[5, 9, 200, 17]], max_new_tokens=8, ignore_eos=True)
    return long.tokens, short.tokens


def detail(fab, i: int) -> dict:
    return fab.stats()["instances"][i]["detail"]


def test_engine_loop_fault_fails_the_request_and_the_next_is_served(fab, reference):
    long_ref, short_ref = reference
    stream = fab.stream(LONG, max_new_tokens=40, ignore_eos=True, request_id="loop-fault")
    got = [next(stream) for _ in range(3)]
    home = fab._homes["loop-fault"]
    faults_before = ray.get(home.health.remote())["loop_faults"]
    ray.get(home.inject_fault.remote("engine_loop"))
    with pytest.raises(fabric.FabricError, match="engine loop of instance .* fault injected"):
        got += list(stream)
    assert len(got) < 40, "the request must have failed, not finished"
    health = ray.get(home.health.remote())
    assert health["loop_faults"] == faults_before + 1 and health["healthy"], health
    # the fabric serves on, the failed instance too (its blocks came back)
    fab._next_home = 0
    results = fab.generate([LONG, [5, 9, 200, 17]], max_new_tokens=40, ignore_eos=True)
    assert results[0].tokens == long_ref
    assert results[1].tokens[:8] == short_ref


def test_a_creditor_that_raises_fails_its_requests_without_recompute_loops(fab, reference):
    long_ref, _ = reference
    fab._next_home = 0                                 # home 0 borrows from instance 1
    recoveries = detail(fab, 0)["recoveries"]
    ray.get(fab.instances[1].inject_fault.remote("serve_attention"))
    (res,) = fab.generate([LONG], max_new_tokens=40, ignore_eos=True, errors="return")
    assert res.error_type == "FabricError", res
    assert "attention on a creditor failed" in res.error and "fault injected" in res.error
    assert detail(fab, 0)["recoveries"] == recoveries, "a raising creditor is not a lost one"
    fab._next_home = 0
    (again,) = fab.generate([LONG], max_new_tokens=40, ignore_eos=True)
    assert again.tokens == long_ref


def test_a_cancelled_id_can_be_used_again(fab, reference):
    _, short_ref = reference
    (first,) = fab.submit([{"id": "reused", "prompt": [5, 9, 200, 17], "max_new_tokens": 8,
                            "ignore_eos": True}])
    assert first.tokens == short_ref
    for inst in fab.instances:                         # a late cancel of a finished request
        assert ray.get(inst.abort.remote("reused")) is False
    out = {}
    worker = threading.Thread(target=lambda: out.update(r=fab.submit(
        [{"id": "reused", "prompt": [5, 9, 200, 17], "max_new_tokens": 8, "ignore_eos": True}])))
    worker.start()
    worker.join(300)
    assert not worker.is_alive(), "a request reusing a cancelled id must not be dropped"
    assert out["r"][0].tokens == short_ref


def test_full_queue_is_a_capacity_error_and_the_fabric_serves_on():
    cfg = {"instances": {"count": 1, "kv_blocks": 16, "block_size": 8, "max_num_seqs": 1,
                         "max_queued_requests": 2}}
    with fabric.start(cfg) as small:
        prompts = [[3 + i, 7, 11] for i in range(12)]
        results = small.generate(prompts, max_new_tokens=4, ignore_eos=True, errors="return")
        full = [r for r in results if r.error is not None]
        assert full, "12 requests at once cannot fit a queue of 2"
        assert all(r.error_type == "CapacityError" and "queue full" in r.error for r in full)
        assert all(len(r.tokens) == 4 for r in results if r.error is None)
        (ok,) = small.generate([prompts[0]], max_new_tokens=4, ignore_eos=True)
        assert len(ok.tokens) == 4
