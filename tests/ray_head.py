"""A real `ray start --head` on 127.0.0.1 for the client and job tests: its own process session,
temp dir and free ports (other clusters may run on the same machine), token authentication as
Ray 2.60 sets it up; stopped by killing that session's processes only (never `ray stop`)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
# Ray's client proxy starts a server process per driver; on busy cores that start fails now and
# then (clusters/README.md, note 6): the new process dies at once (its gRPC poller fails with
# "epoll_wait error: Bad file descriptor") or does not open its port within the proxy's 30 s.
# The driver reached nothing yet, so the tests start such a driver again, up to PROXY_ATTEMPTS.
PROXY_START_FAILURES = ("Starting Ray client server failed", "Initialization failure from server")
PROXY_ATTEMPTS = 3


def proxy_start_failed(output: str) -> bool:
    return any(marker in output for marker in PROXY_START_FAILURES)
WORKER_PORTS = (10002, 19999)


def free_port() -> int:
    """An ephemeral port: above Ray's worker port range."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_command(gcs: int, client: int, dash: int, num_cpus: int, temp: str) -> list[str]:
    """`ray start --head` on 127.0.0.1 with every port chosen here: on a shared machine the
    defaults (agent 52365...) clash with other clusters."""
    return [RAY, "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
            "--ray-client-server-port", str(client), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--num-cpus", str(num_cpus), "--temp-dir", temp,
            "--min-worker-port", str(WORKER_PORTS[0]), "--max-worker-port", str(WORKER_PORTS[1]),
            "--disable-usage-stats",
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port",
            str(free_port()), "--metrics-export-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port())]


def start_head(num_cpus: int = 4) -> dict | str:
    """Start a head; returns its addresses and driver environment, or the reason it failed."""
    if not os.path.exists(RAY):
        return "the ray CLI is not installed beside this Python"
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.path.isfile(os.environ.get(
            "RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")):
        # a fresh machine has no token yet: `ray start` in token mode needs one
        subprocess.run([RAY, "get-auth-token", "--generate"], capture_output=True, timeout=120)
    temp = tempfile.mkdtemp(prefix="kvhead")
    gcs, client, dash = free_port(), free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    cmd = head_command(gcs, client, dash, num_cpus, temp)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    head = {"address": f"127.0.0.1:{gcs}", "client": f"ray://127.0.0.1:{client}",
            "client_port": client, "dashboard": f"http://127.0.0.1:{dash}", "env": env,
            "sid": proc.pid, "temp": temp}
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        out, proc.returncode = "timed out", -1
    if proc.returncode != 0:
        stop_head(head)
        return f"ray start --head failed: {out[-2000:]}"
    return head


def stop_head(head: dict) -> None:
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    for line in ps.splitlines():
        pid, sid = map(int, line.split())
        if sid == head["sid"]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    shutil.rmtree(head["temp"], ignore_errors=True)


def submit_job(head: dict, *command: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`ray job submit -- COMMAND`; the job agent comes up a little after the head."""
    cmd = [RAY, "job", "submit", "--address", head["dashboard"], "--", *command]
    for _ in range(10):
        job = subprocess.run(cmd, env=head["env"], capture_output=True, text=True, timeout=timeout)
        if "No available agent" not in job.stderr:
            break
        time.sleep(2)
    return job
