"""Cluster-launcher configs in clusters/.

- Both YAMLs validate against Ray's own cluster-config schema (ray-schema.json through
  `ray.autoscaler._private.util.validate_config`).
- a100.yaml keeps its promises: token auth on every `ray start`, no Ray port open outside
  the security group, the client port outside the worker port range, an idle timeout,
  GPU resources declared, the project installed on every node.
- local.yaml really runs: a fake multi-node cluster is started from it the way Ray
  supports on one machine (`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`),
  a token-authenticated driver sees the head, asks for more CPUs with
  `request_resources` and gets a second node from the autoscaler; connections without
  the token are refused. Everything binds to 127.0.0.1 and uses its own ports, temp dir
  and token file, so clusters of other test runs on the machine are left alone; teardown
  kills exactly the processes this cluster started (its session), never `ray stop`.
"""

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray")
from ray.autoscaler._private.fake_multi_node.node_provider import (  # noqa: E402
    FAKE_HEAD_NODE_TYPE,
)
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402
from ray_head import PROXY_ATTEMPTS, proxy_start_failed  # noqa: E402

CLUSTERS = Path(__file__).resolve().parents[1] / "clusters"
SCALE_UP_TIMEOUT_S = 60

# Flags of `ray start` that pin a listening port (the worker range is checked apart).
FIXED_PORT_FLAGS = ("--port", "--object-manager-port", "--node-manager-port",
                    "--dashboard-port", "--dashboard-agent-listen-port",
                    "--dashboard-agent-grpc-port", "--runtime-env-agent-port",
                    "--metrics-export-port", "--ray-client-server-port")


def load(name: str) -> dict:
    with open(CLUSTERS / name) as f:
        return yaml.safe_load(f)


def ray_start_commands(config: dict) -> list[str]:
    cmds = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    return [c for c in cmds if "ray start" in c]


def flags(cmd: str) -> dict[str, str]:
    return dict(re.findall(r"(--[a-z-]+)=(\S+)", cmd))


# ---------------------------------------------------------------- schema

@pytest.mark.parametrize("name", ["a100.yaml", "local.yaml"])
def test_validates_against_ray_schema(name):
    # The file as written: the fake cluster's autoscaler reads it without merging defaults.
    validate_config(load(name))


def test_a100_validates_after_ray_up_defaults():
    # What `ray up` does before launching: merge the AWS defaults, then validate.
    validate_config(prepare_config(load("a100.yaml")))


def test_local_yaml_fits_the_fake_provider():
    config = load("local.yaml")
    assert config["provider"]["type"] == "fake_multinode"
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert config["provider"]["gcs_address"].startswith("127.0.0.1:")
    workers = {k: v for k, v in config["available_node_types"].items()
               if k != config["head_node_type"]}
    assert workers and all(w["resources"]["CPU"] >= 1 for w in workers.values())
    assert 0 < sum(w["max_workers"] for w in workers.values()) <= config["max_workers"] <= 2
    assert config["idle_timeout_minutes"] > 0


# ---------------------------------------------------------------- a100.yaml promises

def test_a100_token_auth_on_every_ray_start():
    config = load("a100.yaml")
    starts = ray_start_commands(config)
    assert len(starts) == 2
    for cmd in starts:
        assert re.search(r"(^|[\s;])RAY_AUTH_MODE=token\s+ray start", cmd), cmd
    # Every node gets the same token file the laptop's driver uses.
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"


def test_a100_ray_ports_only_inside_the_security_group():
    provider = load("a100.yaml")["provider"]
    group = provider["security_group"]
    assert group["GroupName"]
    for rule in group.get("IpPermissions", []):
        opens_to_addresses = any(rule.get(k) for k in ("IpRanges", "Ipv6Ranges", "PrefixListIds"))
        if opens_to_addresses:
            assert (rule.get("IpProtocol"), rule.get("FromPort"), rule.get("ToPort")) == \
                ("tcp", 22, 22), f"rule opens more than SSH to outside addresses: {rule}"


def test_a100_effective_ingress_from_rays_own_rules():
    """The rules Ray itself writes into a new group: self-referencing plus SSH, no more."""
    pytest.importorskip("boto3", reason="ray's AWS provider module needs boto3")
    from ray.autoscaler._private.aws.config import _create_default_inbound_rules

    extra = load("a100.yaml")["provider"]["security_group"].get("IpPermissions", [])
    for rule in _create_default_inbound_rules({"sg-self"}, extra):
        if rule.get("IpRanges") or rule.get("Ipv6Ranges") or rule.get("PrefixListIds"):
            assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        else:
            assert rule["UserIdGroupPairs"] == [{"GroupId": "sg-self"}]


def test_a100_client_port_outside_worker_range():
    config = load("a100.yaml")
    head = flags(config["head_start_ray_commands"][-1])
    assert head["--ray-client-server-port"] == "10001"
    assert head["--dashboard-host"] and head["--dashboard-port"]
    for cmd in ray_start_commands(config):
        f = flags(cmd)
        low, high = int(f["--min-worker-port"]), int(f["--max-worker-port"])
        assert 1024 < low <= high < 65536
        for flag in FIXED_PORT_FLAGS:
            if flag in f:
                assert not low <= int(f[flag]) <= high, f"{flag}={f[flag]} in {low}-{high}"
        # Workers and head agree on the range (one security story for every node).
        assert (low, high) == (int(head["--min-worker-port"]), int(head["--max-worker-port"]))


def test_a100_idle_timeout_gpus_and_sizes():
    config = load("a100.yaml")
    assert 0 < config["idle_timeout_minutes"] <= 30
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert len(workers) == 1
    for t in [head, *workers]:
        assert t["node_config"]["InstanceType"] == "p4d.24xlarge"
        assert t["resources"] == {"CPU": 96, "GPU": 8}
        assert t["node_config"]["ImageId"]
    assert 0 <= workers[0]["min_workers"] <= workers[0]["max_workers"] <= config["max_workers"]
    assert config["provider"]["region"] and config["provider"]["availability_zone"]


def test_a100_installs_the_project_from_a_mounted_checkout():
    config = load("a100.yaml")
    assert config["file_mounts"]["~/kv-fabric"] == "."
    setup = " ".join(config["setup_commands"])
    assert re.search(r"pip install .*-e \"?\$HOME/kv-fabric\[test\]", setup), setup
    assert "**/.venv" in config["rsync_exclude"]
    # The head's autoscaler launches EC2 workers: it needs boto3 in the head's environment.
    assert any("boto3" in c for c in config["head_setup_commands"])


# ---------------------------------------------------------------- live fake cluster

def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 (all held open until all are chosen)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port_block(size: int = 100) -> tuple[int, int]:
    """A block below Linux's ephemeral range (32768+) and above Ray's default worker
    range (10002-19999) of other clusters on this machine, all bindable right now."""
    for low in range(20000, 30000, size):
        try:
            for port in range(low, low + size):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
        except OSError:
            continue
        return low, low + size - 1
    pytest.skip("no free block of worker ports in 20000-29999")


def session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()   # state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid and int(entry) != os.getpid():
            pids.append(int(entry))
    return pids


def kill_session(sid: int, grace_s: float = 3.0) -> None:
    """SIGTERM, then SIGKILL, every process of the session the cluster was started in.

    Like `ray stop --force`, but only for this cluster. The GCS, the autoscaler and fake
    workers' raylets outlive SIGTERM for many seconds, hence the short grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while session_pids(sid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not session_pids(sid):
            return


class FakeCluster:
    def __init__(self, root: Path, env: dict, gcs: int, client: int, dashboard: int):
        self.root, self.env = root, env
        self.gcs_address = f"127.0.0.1:{gcs}"
        self.client_address = f"ray://127.0.0.1:{client}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard}"
        self.token = (root / "auth_token").read_text()

    def driver_env(self, auth: bool = True, token_file: Path | None = None) -> dict:
        """The environment a user's driver runs in: RAY_AUTH_MODE=token plus the token."""
        env = dict(self.env)
        env.pop("RAY_FAKE_CLUSTER", None)
        if not auth:
            env.pop("RAY_AUTH_MODE", None)
        if token_file is not None:
            env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
        return env

    def run_driver(self, code: str, timeout: float, **env_kw) -> dict:
        # run again if the client proxy failed to start a `ray://` driver's server
        for _ in range(PROXY_ATTEMPTS):
            out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=False,
                                 env=self.driver_env(**env_kw), capture_output=True, text=True,
                                 timeout=timeout, cwd=self.root)
            if out.returncode == 0 or not proxy_start_failed(out.stderr):
                break
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
        assert out.returncode == 0 and lines, (f"driver failed:\n{out.stdout}\n"
                                               f"{out.stderr[-3000:]}{self.client_logs()}")
        return json.loads(lines[-1])

    def client_logs(self) -> str:
        """The tails of the Ray client server's logs: the proxier's, and each per-client
        server's (a driver sees only "Starting Ray client server failed")."""
        parts = []
        for path in sorted((self.root / "ray").glob("session_*/logs/ray_client_server*")):
            if path.parent.parent.is_symlink():
                continue
            text = path.read_text(errors="replace")[-3000:]
            if text.strip():
                parts.append(f"\n--- {path.name} ---\n{text}")
        return "".join(parts)


@pytest.fixture(scope="module")
def fake_cluster():
    if not Path("/proc/self/stat").exists():
        pytest.skip("teardown finds the cluster's processes through /proc (Linux only)")
    ray_bin = Path(sys.executable).with_name("ray")
    if not ray_bin.exists():
        ray_bin = Path(shutil.which("ray") or "")
    if not ray_bin.is_file():
        pytest.skip("the `ray` CLI is not installed next to this Python")

    gcs, client, dashboard, agent = free_ports(4)
    low, high = free_port_block()
    # A short path: Ray's Unix sockets live under the temp dir (108-byte limit).
    root = Path(tempfile.mkdtemp(prefix="kvf-", dir="/tmp"))

    # The user's ~/.ray/auth_token stays untouched: this cluster has its own token file.
    token_file = root / "auth_token"
    token_file.write_text(secrets.token_hex(32))
    token_file.chmod(0o600)

    config = load("local.yaml")
    config["provider"]["gcs_address"] = f"127.0.0.1:{gcs}"
    (root / "local.yaml").write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_ADDRESS", "RAY_AUTH_TOKEN"))}
    env.update({
        "RAY_FAKE_CLUSTER": "1",               # FakeMultiNodeProvider refuses to load without
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",   # autoscaler loop every 1 s instead of 5 s
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token_file),
        # Laptop mode: node IPs are 127.0.0.1 (Linux otherwise uses the primary interface
        # and Ray rewrites --node-ip-address=127.0.0.1 to it). Drivers must set it too.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    })
    cmd = [str(ray_bin), "start", "--head", "--node-ip-address=127.0.0.1",
           f"--port={gcs}", "--num-cpus=1", "--object-store-memory=100000000",
           f"--autoscaling-config={root / 'local.yaml'}", f"--temp-dir={root / 'ray'}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
           f"--dashboard-agent-listen-port={agent}", f"--ray-client-server-port={client}",
           f"--min-worker-port={low}", f"--max-worker-port={high}", "--disable-usage-stats"]
    # A session of its own: teardown kills exactly this session's processes.
    with open(root / "ray_start.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=root)
    try:
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            rc = None
        if rc != 0:
            pytest.fail(f"`ray start --head` failed ({rc}):\n"
                        + (root / "ray_start.log").read_text()[-4000:])
        yield FakeCluster(root, env, gcs, client, dashboard)
    finally:
        kill_session(proc.pid)
        left = session_pids(proc.pid)
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the fake cluster survived teardown: {left}"


def test_fake_cluster_head_up_then_autoscaler_adds_a_worker(fake_cluster):
    result = fake_cluster.run_driver(f"""
        import json, time
        import ray
        from ray.autoscaler.sdk import request_resources

        ray.init(address="{fake_cluster.gcs_address}", log_to_driver=False)
        before = ray.cluster_resources()
        nodes_before = [n for n in ray.nodes() if n["Alive"]]
        t0 = time.monotonic()
        request_resources(num_cpus=2)
        scaled = False
        while not scaled and time.monotonic() - t0 < {SCALE_UP_TIMEOUT_S}:   # a hang guard
            alive = [n for n in ray.nodes() if n["Alive"]]
            scaled = len(alive) >= 2 and ray.cluster_resources().get("CPU", 0) >= 2
            if not scaled:
                time.sleep(0.5)
        scale_up_s = time.monotonic() - t0

        @ray.remote(num_cpus=1)
        def where():
            time.sleep(0.5)
            return ray.get_runtime_context().get_node_id()

        placed = ray.get([where.remote() for _ in range(2)], timeout=60)
        print(json.dumps({{
            "before": before, "nodes_before": len(nodes_before),
            "after": ray.cluster_resources(), "scaled": scaled, "scale_up_s": scale_up_s,
            "node_ips": sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]),
            "placed_on": sorted(set(placed)),
        }}))
    """, timeout=SCALE_UP_TIMEOUT_S + 60)

    # The head alone: its one CPU and the head marker.
    assert result["nodes_before"] == 1
    assert result["before"]["CPU"] == 1
    assert "node:__internal_head__" in result["before"]
    # The fake autoscaler added a 1-CPU worker, and it runs tasks (how long it took is reported,
    # not judged: the polling deadline only stops a run that never scales).
    print(f"fake autoscaler scale-up: {result['scale_up_s']:.1f} s")
    assert result["scaled"], "the fake autoscaler never added the worker"
    assert result["after"]["CPU"] == 2
    assert result["node_ips"] == ["127.0.0.1", "127.0.0.1"]
    assert len(result["placed_on"]) == 2


def test_fake_cluster_ray_client_with_token(fake_cluster):
    result = fake_cluster.run_driver(f"""
        import json
        import ray
        ray.init("{fake_cluster.client_address}", log_to_driver=False)
        print(json.dumps({{"resources": ray.cluster_resources(),
                          "echo": ray.get(ray.put(41)) + 1}}))
    """, timeout=90)
    assert result["echo"] == 42
    assert "node:__internal_head__" in result["resources"]


def test_fake_cluster_refuses_connections_without_the_token(fake_cluster, tmp_path):
    attempt = f"""
        import json
        import ray
        try:
            ray.init("{fake_cluster.client_address}", log_to_driver=False)
            print(json.dumps({{"connected": True}}))
        except ConnectionError as e:
            print(json.dumps({{"connected": False, "error": str(e)}}))
    """
    wrong = tmp_path / "wrong_token"
    wrong.write_text(secrets.token_hex(32))
    # Short client retries: a refused handshake otherwise retries for 30 s.
    fast = {"RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1",
            "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "2"}
    cases = {"no RAY_AUTH_MODE": fake_cluster.driver_env(auth=False),
             "wrong token": fake_cluster.driver_env(token_file=wrong)}
    procs = {name: subprocess.Popen([sys.executable, "-c", textwrap.dedent(attempt)],
                                    env={**env, **fast}, stdout=subprocess.PIPE,
                                    stderr=subprocess.DEVNULL, text=True)
             for name, env in cases.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=60)
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        assert lines and json.loads(lines[-1])["connected"] is False, (name, out)

    # The dashboard's HTTP API (what `ray job submit` talks to) wants the bearer token too.
    url = fake_cluster.dashboard_url + "/api/version"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    request = urllib.request.Request(
        url, headers={"Authorization": f"Bearer {fake_cluster.token}"})
    with urllib.request.urlopen(request, timeout=10) as ok:
        assert ok.status == 200

