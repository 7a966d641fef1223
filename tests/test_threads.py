"""An instance's threads beside the engine loop hand back their OpenMP teams
(`fabric/threads.py`): a thread that ran a parallel torch op holds worker threads until it
calls `release_pool`, and holds none after."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from fabric import threads

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def in_new_thread(fn) -> None:
    """Run `fn` in a fresh thread with 2 torch threads (a team needs two, even on one core)."""
    if "OpenMP" not in torch.__config__.parallel_info() or threads._pause() is None:
        pytest.skip("torch here does not run on libgomp")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        t = threading.Thread(target=fn)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(old)


def test_release_pool_hands_back_the_threads_team():
    seen = {}

    def work():
        a = torch.randn(512, 512)
        seen["before"] = tasks()
        for _ in range(3):
            (a @ a).exp_()           # parallel ops: this thread forks its team
        seen["with_team"] = tasks()
        seen["released"] = threads.release_pool()
        seen["after"] = tasks()
        (a @ a).exp_()               # torch still works: a fresh team
        seen["again"] = tasks()
        threads.release_pool()

    in_new_thread(work)
    assert seen["released"] is True
    assert seen["with_team"] > seen["before"]
    assert seen["after"] < seen["with_team"]
    assert seen["again"] > seen["after"]


def test_beside_engine_releases_after_the_call_and_keeps_its_result():
    seen = {}

    @threads.beside_engine
    def work(a):
        (a @ a).exp_()               # forks this thread's team
        seen["inside"] = tasks()
        return a.shape

    def run():
        seen["before"] = tasks()
        seen["result"] = work(torch.randn(512, 512))
        seen["after"] = tasks()

    in_new_thread(run)
    assert seen["result"] == (512, 512) and work.__name__ == "work"
    assert seen["inside"] > seen["before"] and seen["after"] < seen["inside"]
