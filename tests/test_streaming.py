"""Streaming and cancellation on an embedded fabric: streamed tokens equal `generate`'s, and a
cancelled request (one borrowing blocks) gives every block back at once."""

import time

import pytest

ray = pytest.importorskip("ray")
import fabric  # noqa: E402


@pytest.fixture(scope="module")
def fab():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    f = fabric.start({"instances": {"count": 2, "kv_blocks": 10, "block_size": 8,
                                    "max_batch_tokens": 32}})
    yield f
    f.shutdown()
    ray.shutdown()


def all_free(fab) -> bool:
    return all(s["blocks_free"] == s["blocks_total"] for s in fab.stats()["instances"])


def test_stream_matches_generate(fab):
    prompt = [5, 9, 200, 17, 3, 88, 41]
    (ref,) = fab.generate([prompt], max_new_tokens=12, ignore_eos=True)
    streamed = list(fab.stream(prompt, max_new_tokens=12, ignore_eos=True))
    assert streamed == ref.tokens
    with pytest.raises(fabric.RequestError):
        list(fab.stream([], max_new_tokens=3))


def test_cancel_frees_local_and_borrowed_blocks(fab):
    prompt = list(range(1, 110))                       # 109 + 40 tokens = 19 blocks > 10 local
    it = fab.stream(prompt, max_new_tokens=40, ignore_eos=True, request_id="long-1")
    first = [next(it) for _ in range(3)]
    assert len(first) == 3
    busy = fab.stats()["instances"]
    assert sum(s["blocks_borrowed"] for s in busy) > 0, "the long request should borrow"
    assert fab.cancel("long-1") is True
    t0 = time.perf_counter()
    while not all_free(fab) and time.perf_counter() - t0 < 5:
        time.sleep(0.02)
    assert all_free(fab), "cancel must free local and borrowed blocks"
    it.close()
    assert fab.cancel("long-1") is False


def test_breaking_out_of_a_stream_cancels(fab):
    it = fab.stream(list(range(1, 60)), max_new_tokens=50, ignore_eos=True)
    for i, _ in enumerate(it):
        if i == 2:
            break
    it.close()
    t0 = time.perf_counter()
    while not all_free(fab) and time.perf_counter() - t0 < 5:
        time.sleep(0.02)
    assert all_free(fab)
    (ok,) = fab.generate([[1, 2, 3]], max_new_tokens=4)
    assert len(ok.tokens) >= 1
