"""The client path against a real head node: `ray start --head` on 127.0.0.1 with the client
server and the dashboard; a detached fabric started over `ray://` outlives its driver, another
driver reaches it with `fabric.connect`, a `ray job submit` job uses it, and it shuts down."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head():
    if not os.path.exists(RAY):
        pytest.skip("the ray CLI is not installed beside this Python")
    temp = tempfile.mkdtemp(prefix="kvfh")
    gcs, client, dash = free_port(), free_port(), free_port()   # ephemeral: above the worker range
    assert not 10002 <= client <= 19999, "the client server port must lie outside the worker ports"
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
           "--ray-client-server-port", str(client), "--dashboard-host", "127.0.0.1",
           "--dashboard-port", str(dash), "--num-cpus", "4", "--temp-dir", temp,
           "--min-worker-port", "10002", "--max-worker-port", "19999", "--disable-usage-stats",
           # every other port free too: on a shared machine the defaults (agent 52365...) clash
           "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port",
           str(free_port()), "--metrics-export-port", str(free_port()),
           "--runtime-env-agent-port", str(free_port())]
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode != 0:
        pytest.skip(f"ray start failed: {out[-2000:]}")
    try:
        yield {"client": f"ray://127.0.0.1:{client}", "dashboard": f"http://127.0.0.1:{dash}",
               "env": env}
    finally:
        _kill_session(proc.pid)
        shutil.rmtree(temp, ignore_errors=True)


def _kill_session(sid: int) -> None:
    """Stop only the Ray processes of our own head (never `ray stop`: other clusters may run)."""
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, s = map(int, line.split())
        if s == sid:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def run_driver(code: str, env: dict, timeout: int = 180) -> str:
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=timeout)
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

    submit = [RAY, "job", "submit", "--address", head["dashboard"], "--", sys.executable, "-c",
              CONNECT.format(addr="auto", end="fab.shutdown()")]
    for _ in range(10):      # the job agent comes up a little after the head
        job = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=240)
        if "No available agent" not in job.stderr:
            break
        time.sleep(2)
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
