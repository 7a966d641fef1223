"""The client path against a real head node: `ray start --head` on 127.0.0.1 with the client
server and the dashboard; a detached fabric started over `ray://` outlives its driver, another
driver reaches it with `fabric.connect`, a `ray job submit` job uses it, and it shuts down."""

import subprocess
import sys

import pytest
from ray_head import PROXY_ATTEMPTS, WORKER_PORTS, proxy_start_failed, submit_job

@pytest.fixture(scope="module")
def head(ray_head):
    assert not WORKER_PORTS[0] <= ray_head["client_port"] <= WORKER_PORTS[1], \
        "the client server port must lie outside the worker ports"
    return ray_head


def run_driver(code: str, env: dict, timeout: int = 180) -> str:
    for attempt in range(PROXY_ATTEMPTS):
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, timeout=timeout)
        if res.returncode == 0 or not proxy_start_failed(res.stderr):
            break
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


START = """
import fabric
fab = fabric.start({{"instances": {{"count": 2, "kv_blocks": 8, "block_size": 8}}}},
                   address={addr!r}, name="prod", detached=True)
(r,) = fab.generate([list(range(1, 90))], max_new_tokens=6, ignore_eos=True)
print("TOKENS", r.tokens)
"""

CONNECT = """
import fabric
fab = fabric.connect("prod", address={addr!r})
(r,) = fab.generate([list(range(1, 90))], max_new_tokens=6, ignore_eos=True)
print("TOKENS", r.tokens)
print("BORROWS", fab.stats()["lending"]["borrow_events"])
{end}
"""


def tokens_of(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("TOKENS"))


def test_detached_fabric_over_ray_client_and_job_submit(head):
    env = head["env"]
    first = tokens_of(run_driver(START.format(addr=head["client"]), env))
    second = run_driver(CONNECT.format(addr=head["client"], end=""), env)
    assert tokens_of(second) == first, "the detached fabric should answer the same after its driver left"
    assert int(second.split("BORROWS")[1].split()[0]) >= 1   # 89 + 6 tokens > 8 blocks of 8

    job = submit_job(head, sys.executable, "-c", CONNECT.format(addr="auto", end="fab.shutdown()"))
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    assert tokens_of(job.stdout) == first

    gone = subprocess.run([sys.executable, "-c", "import fabric\n"
                           f"fabric.connect('prod', address={head['client']!r})"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert gone.returncode != 0 and "no fabric named 'prod'" in gone.stderr


def test_refused_connection_says_why(head):
    env = {k: v for k, v in head["env"].items() if k != "RAY_AUTH_MODE"}
    bad = subprocess.run([sys.executable, "-c", "import fabric\n"
                          "fabric.start(address='ray://127.0.0.1:1')"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "could not connect to Ray" in bad.stderr


def test_client_server_start_failure_is_told_apart():
    """`ray://` connects are tried again only when the proxy could not start this driver's
    server: the texts Ray's client raises then (from its proxier and worker); not for another
    init failure, a connection timeout, or the proxier's text outside an init failure."""
    from fabric.api import client_start_failed

    started = ConnectionAbortedError("Initialization failure from server:\nTraceback (most "
                                     "recent call last):\nRuntimeError: Starting Ray client "
                                     "server failed. See ray_client_server_23001.err for "
                                     "detailed logs.")
    no_channel = ConnectionAbortedError("Initialization failure from server:\nRuntimeError: "
                                        "Proxy failed to Connect to backend! Check "
                                        "`ray_client_server.err`")
    assert client_start_failed(started) and client_start_failed(no_channel)
    for other in (ConnectionAbortedError("Initialization failure from server:\nValueError: "
                                         "bad runtime_env"),
                  ConnectionError("ray client connection timeout"),
                  RuntimeError("Starting Ray client server failed")):   # not from the init
        assert not client_start_failed(other), other
