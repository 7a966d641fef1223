"""An instance's threads beside the engine loop hand back their OpenMP teams
(`fabric/threads.py`): a thread that ran a parallel torch op holds worker threads until it
calls `release_pool`, and holds none after."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from fabric import threads


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_release_pool_hands_back_the_threads_team():
    if "OpenMP" not in torch.__config__.parallel_info() or threads._pause() is None:
        pytest.skip("torch here does not run on libgomp")
    old = torch.get_num_threads()
    torch.set_num_threads(2)        # a team needs two threads, even on one core
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

    try:
        t = threading.Thread(target=work)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(old)
    assert seen["released"] is True
    assert seen["with_team"] > seen["before"]
    assert seen["after"] < seen["with_team"]
    assert seen["again"] > seen["after"]


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_beside_engine_releases_after_the_call_and_keeps_its_result():
    if "OpenMP" not in torch.__config__.parallel_info() or threads._pause() is None:
        pytest.skip("torch here does not run on libgomp")

    @threads.beside_engine
    def work(a):
        (a @ a).exp_()               # forks this thread's team
        seen["inside"] = tasks()
        return a.shape

    old, seen = torch.get_num_threads(), {}
    torch.set_num_threads(2)

    def run():
        seen["before"] = tasks()
        seen["result"] = work(torch.randn(512, 512))
        seen["after"] = tasks()

    try:
        t = threading.Thread(target=run)
        t.start()
        t.join()
    finally:
        torch.set_num_threads(old)
    assert seen["result"] == (512, 512) and work.__name__ == "work"
    assert seen["inside"] > seen["before"] and seen["after"] < seen["inside"]
