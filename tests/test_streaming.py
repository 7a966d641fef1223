"""Streaming and cancellation on an embedded fabric: streamed tokens equal `generate`'s, and a
cancelled request (one borrowing blocks) gives every block back.

Cancellation is checked while every instance is paused between two steps
(`InstanceActor.pause`): a paused fabric generates nothing, so a request seen live at the pause
that then leaves the books, its blocks freed, while no token was made, was cancelled; it cannot
have finished. No test asserts how long anything took: polling deadlines only stop a broken run
from hanging."""

import time
from contextlib import contextmanager

import pytest

ray = pytest.importorskip("ray")
import fabric  # noqa: E402

DEADLINE_S = 60.0


@pytest.fixture(scope="module")
def fab():
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    f = fabric.start({"instances": {"count": 2, "kv_blocks": 10, "block_size": 8,
                                    "max_batch_tokens": 32}})
    yield f
    f.shutdown()
    ray.shutdown()


def totals(fab) -> dict:
    """The fabric's books summed over its instances."""
    inst = fab.stats()["instances"]
    return {"live": sum(s["detail"]["num_running"] + s["detail"]["num_waiting"] for s in inst),
            "generated": sum(s["detail"]["num_generated"] for s in inst),
            "borrowed": sum(s["blocks_borrowed"] for s in inst),
            "all_free": all(s["blocks_free"] == s["blocks_total"] for s in inst)}


def wait_until(cond) -> bool:
    end = time.monotonic() + DEADLINE_S
    while not cond() and time.monotonic() < end:
        time.sleep(0.02)
    return cond()


def pause(fab) -> None:
    """Park every instance between two steps: nothing is generated until `resume`."""
    assert all(ray.get([a.pause.remote() for a in fab.instances], timeout=DEADLINE_S))


def resume(fab) -> None:
    ray.get([a.resume.remote() for a in fab.instances], timeout=DEADLINE_S)


@contextmanager
def paused(fab):
    try:
        pause(fab)
        yield
    finally:
        resume(fab)


def longest_output(fab, prompt_len: int) -> int:
    """max_new_tokens filling the largest request the fabric admits: it cannot finish between
    one of its first tokens and the pause that follows at once."""
    return fab.max_request_blocks * fab.block_size - prompt_len


def test_stream_matches_generate(fab):
    prompt = [5, 9, 200, 17, 3, 88, 41]
    (ref,) = fab.generate([prompt], max_new_tokens=12, ignore_eos=True)
    streamed = list(fab.stream(prompt, max_new_tokens=12, ignore_eos=True))
    assert streamed == ref.tokens
    with pytest.raises(fabric.RequestError):
        list(fab.stream([], max_new_tokens=3))


def test_cancel_frees_local_and_borrowed_blocks(fab):
    prompt = list(range(1, 89))              # 11 blocks of 8 > the home's 10: KV on a creditor
    max_new = longest_output(fab, len(prompt))
    it = fab.stream(prompt, max_new_tokens=max_new, ignore_eos=True, request_id="long-1")
    first = [next(it)]
    with paused(fab):
        live = totals(fab)
        assert live["live"] == 1, "the request must still be running when the fabric pauses"
        assert live["borrowed"] > 0, "the long request should borrow"
        assert fab.cancel("long-1") is True
        rest = list(it)                      # tokens made before the cancel, then the end
        assert wait_until(lambda: totals(fab)["all_free"]), \
            "cancel must free local and borrowed blocks"
        after = totals(fab)
        assert after["live"] == 0 and after["borrowed"] == 0
        assert after["generated"] == live["generated"], "nothing may run while paused"
    assert len(first) + len(rest) < max_new, "the request finished instead of being cancelled"
    assert fab.cancel("long-1") is False     # gone: nothing left to cancel


def test_breaking_out_of_a_stream_cancels(fab):
    prompt = list(range(1, 60))
    max_new = longest_output(fab, len(prompt))
    received, live = 0, None
    try:
        # The loop's iterator is the only reference to the stream: leaving the loop drops it,
        # which closes the generator (CPython) and so cancels the request.
        for _ in fab.stream(prompt, max_new_tokens=max_new, ignore_eos=True):
            received += 1
            if received == 3:
                pause(fab)
                live = totals(fab)
                break
        assert live is not None and live["live"] == 1, \
            "the request must still be running when the fabric pauses"
        assert wait_until(lambda: (t := totals(fab))["all_free"] and t["live"] == 0), \
            "leaving the loop must cancel the request and free its blocks"
        assert totals(fab)["generated"] == live["generated"], "nothing may run while paused"
    finally:
        resume(fab)
    (ok,) = fab.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)   # serving goes on
    assert len(ok.tokens) == 4
    assert wait_until(lambda: totals(fab)["all_free"])
