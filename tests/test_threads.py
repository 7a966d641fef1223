"""An instance's threads beside the engine loop hand back their OpenMP teams
(`fabric/threads.py`): a thread that ran a parallel torch op holds worker threads until it
calls `release_pool`, and holds none after.

Each case runs in a fresh Python process, so that the thread count it reads is its own: in the
test process, threads left by earlier tests (Ray's, the transport's) come and go beside it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fabric import threads

pytestmark = [
    pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc"),
    pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info() or threads._pause() is None,
                       reason="torch here does not run on libgomp"),
]

PRELUDE = textwrap.dedent("""
    import json, os, threading, time
    import torch
    from fabric import threads

    def tasks():
        return len(os.listdir("/proc/self/task"))

    def fewer_than(n, timeout_s=30.0):
        # a released worker leaves /proc once it has exited: wait for that, do not race it
        deadline = time.monotonic() + timeout_s
        while tasks() >= n and time.monotonic() < deadline:
            time.sleep(0.01)
        return tasks()

    seen = {}
    torch.set_num_threads(2)     # a team needs two threads, even on one core
""")


def run_case(body: str) -> dict:
    """Run `body` (which fills `seen`) in a fresh thread of a fresh process; return `seen`."""
    script = PRELUDE + textwrap.dedent("""
        def work():
        {body}
        t = threading.Thread(target=work)
        t.start()
        t.join()
        print(json.dumps(seen))
    """).replace("{body}", textwrap.indent(textwrap.dedent(body), "    "))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_release_pool_hands_back_the_threads_team():
    seen = run_case("""
        a = torch.randn(512, 512)
        seen["before"] = tasks()
        for _ in range(3):
            (a @ a).exp_()           # parallel ops: this thread forks its team
        seen["with_team"] = tasks()
        seen["released"] = threads.release_pool()
        seen["after"] = fewer_than(seen["with_team"])
        (a @ a).exp_()               # torch still works: a fresh team
        seen["again"] = tasks()
        threads.release_pool()
    """)
    assert seen["released"] is True
    assert seen["with_team"] > seen["before"]
    assert seen["after"] < seen["with_team"]
    assert seen["again"] > seen["after"]


def test_beside_engine_releases_after_the_call_and_keeps_its_result():
    seen = run_case("""
        @threads.beside_engine
        def job(a):
            (a @ a).exp_()           # forks this thread's team
            seen["inside"] = tasks()
            return list(a.shape)

        seen["before"] = tasks()
        seen["result"] = job(torch.randn(512, 512))
        seen["after"] = fewer_than(seen["inside"])
        seen["name"] = job.__name__
    """)
    assert seen["result"] == [512, 512] and seen["name"] == "job"
    assert seen["inside"] > seen["before"] and seen["after"] < seen["inside"]
