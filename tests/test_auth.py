"""Ray's auth mode for drivers that name an address (`fabric/auth.py`), against real clusters:

- a cluster without token authentication (`ray.cluster_utils.Cluster`) while a token file is
  present: `fabric.start(address=...)` connects without token mode and generates;
  RAY_AUTH_MODE=token forced against it fails at once with an authentication `FabricError`;
- the token cluster of `tests/ray_head.py` (`ray start --head`, token auth): a driver that set
  nothing picks token mode from the cluster's answer (and says so); a wrong token, or
  RAY_AUTH_MODE=disabled, gets a `FabricError` that names authentication.

Every driver runs in its own process: Ray keeps the auth mode per process."""

import json
import os
import secrets
import select
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from ray_head import PROXY_ATTEMPTS, free_port, proxy_start_failed, stop_head

pytest.importorskip("ray")

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")
CONFIG = {"instances": {"count": 1, "kv_blocks": 16, "block_size": 8}}

HOLDER = """
import sys
from ray.cluster_utils import Cluster
c = Cluster(initialize_head=True, connect=False, head_node_args={args!r})
print("ADDR", c.address, flush=True)
sys.stdin.read()                      # until the test closes stdin
c.shutdown()
"""


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update(extra)
    return env


def run(code: str, env: dict, timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def plain_cluster():
    """A one-node cluster without token authentication, in a process (and session) of its own,
    so that no RAY_AUTH_MODE of this test process reaches it."""
    temp = tempfile.mkdtemp(prefix="kvauth")        # short: Ray's socket paths live here
    args = {"num_cpus": 2, "include_dashboard": False, "temp_dir": temp,
            "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port(),
            "runtime_env_agent_port": free_port()}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(args=args)],
                            env=clean_env(RAY_AUTH_MODE="disabled"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines, address, deadline = [], None, time.monotonic() + 180
    while address is None and time.monotonic() < deadline and proc.poll() is None:
        if select.select([proc.stdout], [], [], 1.0)[0]:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("ADDR "):
                address = line.split()[1]
    try:
        if address is None:
            pytest.fail("the cluster without auth did not start:\n" + "".join(lines)[-3000:])
        yield address
    finally:
        try:
            proc.stdin.close()
            proc.wait(timeout=60)
        except Exception:
            pass
        stop_head({"sid": proc.pid, "temp": temp})     # whatever of its session is left


@pytest.fixture()
def token_file(tmp_path):
    path = tmp_path / "auth_token"
    path.write_text(secrets.token_hex(32))
    path.chmod(0o600)
    return path


def test_auth_module_does_not_import_ray():
    res = run("import sys, fabric.auth\nassert 'ray' not in sys.modules, 'ray imported'",
              clean_env())
    assert res.returncode == 0, res.stderr[-2000:]


def test_endpoint_of_an_address():
    from fabric.auth import endpoint

    assert endpoint("ray://10.0.0.1:10001") == ("client", "10.0.0.1:10001")
    assert endpoint("ray://head") == ("client", "head:10001")
    assert endpoint("10.0.0.1:6379") == ("gcs", "10.0.0.1:6379")
    assert endpoint("local") is None


def test_token_file_does_not_turn_token_mode_on(plain_cluster, token_file):
    """A token file exists (RAY_AUTH_TOKEN_PATH, and perhaps ~/.ray/auth_token too) but the
    cluster has no authentication: the driver connects without token mode and generates."""
    res = run(f"""
        import os
        import fabric
        fab = fabric.start({CONFIG!r}, address={plain_cluster!r})
        (r,) = fab.generate([[1, 2, 3, 4]], max_new_tokens=4, ignore_eos=True)
        print("TOKENS", r.tokens)
        print("MODE", os.environ.get("RAY_AUTH_MODE"))
        fab.shutdown()
    """, clean_env(RAY_AUTH_TOKEN_PATH=str(token_file)))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout.splitlines()
    tokens = next(ln for ln in out if ln.startswith("TOKENS")).split(None, 1)[1]
    assert len(json.loads(tokens)) == 4
    assert "MODE None" in out                      # nothing left behind in the environment
    assert "requires token authentication" not in res.stderr


def test_forced_token_mode_against_a_cluster_without_auth(plain_cluster, token_file):
    res = run(f"""
        import fabric
        try:
            fabric.start({CONFIG!r}, address={plain_cluster!r})
        except fabric.FabricError as e:
            print("FABRICERROR", e)
    """, clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file)))
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("FABRICERROR")), "")
    assert "authentication" in line and "unset RAY_AUTH_MODE" in line, \
        res.stdout[-3000:] + res.stderr[-3000:]


def without(env: dict, *names: str, **extra) -> dict:
    env = {k: v for k, v in env.items() if k not in names}
    env.update(extra)
    return env




@pytest.mark.parametrize("via", ["address", "client"])
def test_token_mode_chosen_from_the_cluster(ray_head, via):
    """RAY_AUTH_MODE unset: the cluster refuses an unauthenticated call, so the driver uses
    token mode (with the token `ray start` used) and says why on stderr."""
    code = f"""
        import fabric
        try:
            fabric.connect("absent", address={ray_head[via]!r})
        except fabric.FabricError as e:
            print("FABRICERROR", e)
    """
    env = without(ray_head["env"], "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    for _ in range(PROXY_ATTEMPTS):
        res = run(code, env, timeout=180)
        if not proxy_start_failed(res.stdout + res.stderr):
            break
    assert "no fabric named 'absent'" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
    assert "requires token authentication: using RAY_AUTH_MODE=token" in res.stderr, \
        res.stderr[-3000:]


@pytest.mark.parametrize("case", ["wrong token", "RAY_AUTH_MODE=disabled"])
def test_refused_authentication_is_a_fabric_error(ray_head, case, tmp_path):
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    env = (without(ray_head["env"], "RAY_AUTH_TOKEN", RAY_AUTH_TOKEN_PATH=str(wrong))
           if case == "wrong token" else without(ray_head["env"], RAY_AUTH_MODE="disabled"))
    res = run(f"""
        import fabric
        try:
            fabric.start({CONFIG!r}, address={ray_head['address']!r})
        except fabric.FabricError as e:
            print("FABRICERROR", e)
    """, env, timeout=120)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("FABRICERROR")), "")
    assert "authentication" in line and "RAY_AUTH_TOKEN" in line, \
        res.stdout[-3000:] + res.stderr[-3000:]
