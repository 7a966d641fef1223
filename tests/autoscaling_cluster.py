"""A local Ray cluster whose autoscaler runs Ray's *fake multi-node provider*: `ray start --head
--autoscaling-config=...` with RAY_FAKE_CLUSTER=1, so the head's monitor process "launches" worker
nodes as extra raylets on this machine when demand (pending tasks/actors, or
`ray.autoscaler.sdk.request_resources`) calls for them, and removes them after the idle timeout.

Why not `ray.cluster_utils.AutoscalingCluster`: in Ray 2.60 it runs `ray stop --force` on start and
on shutdown (that would kill every other Ray cluster on a shared machine), binds the default ports,
and reads `fake_multi_node/example.yaml`, which the installed wheel does not ship. This helper
follows tests/ray_head.py instead: its own process session, temp dir and free ports, token
authentication as `ray start` sets it up, and teardown that kills only the processes it started.

Driver side (the process that calls `ray.init(address=...)` / `fabric.start(address=...)`):

* RAY_AUTH_MODE=token. `ray start` turns token authentication on (the token is
  ~/.ray/auth_token, created if missing); a driver that connects to an explicit address does not
  turn it on by itself and then hangs until the connect timeout. The context manager sets
  RAY_AUTH_MODE=token in os.environ for its duration (restoring the old value on exit) and
  refreshes Ray's cached config, so it need not be set before `import ray`; subprocess drivers
  inherit it from os.environ (or add DRIVER_ENV to theirs).
* Nothing else: RAY_FAKE_CLUSTER and AUTOSCALER_UPDATE_INTERVAL_S only matter to the head's
  autoscaler (monitor) process and are set on `ray start` only.
* A process holds one driver connection at a time: if this process is already connected to a
  Ray cluster (e.g. an earlier test's `ray.init()` in the same pytest session), the context
  manager calls `ray.shutdown()` on entry (actors/objects of that connection are gone), so
  `ray.init(address=...)` inside does not raise "Maybe you called ray.init twice". On exit it
  calls `ray.shutdown()` if this process is still connected to this cluster, then kills the
  cluster; a later plain `ray.init()` starts a fresh local cluster as usual.
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/ray_head.py

from ray_head import RAY, free_port, head_command

WORKER_TYPE = "cpu_worker"
HEAD_TYPE = "ray.head.default"    # the name the fake provider gives the head node type
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # per node; small, several fake nodes share /dev/shm


# What a driver started as a subprocess needs on top of os.environ (see the module docstring).
DRIVER_ENV = {"RAY_AUTH_MODE": "token"}


def autoscaling_config(gcs: str, head_cpus: int, worker_cpus: int, max_workers: int,
                       idle_timeout_minutes: float) -> dict:
    """The full autoscaler config (the monitor does not merge defaults: every key is needed)."""
    return {
        "cluster_name": "fake_multinode",
        "max_workers": max_workers,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs,            # else the provider starts fake nodes against IP:6379
            "use_node_id_as_ip": True,     # several raylets share one IP
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": {
            HEAD_TYPE: {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {
                "resources": {"CPU": worker_cpus, "object_store_memory": OBJECT_STORE_BYTES},
                "node_config": {}, "min_workers": 0, "max_workers": max_workers,
            },
        },
        "head_node_type": HEAD_TYPE,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "auth": {}, "docker": {}, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": [], "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
    }


def _cluster_pids(sid: int, temp: str) -> list[int]:
    """Live processes of the head's session, and any other process whose command line names this
    cluster's temp dir (raylets, workers and agents of the fake nodes); zombies left out."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,stat=,args="], capture_output=True,
                         text=True, check=False).stdout
    pids = []
    for line in out.splitlines():
        parts = line.split(None, 3)
        if len(parts) < 3 or parts[2].startswith("Z"):
            continue
        pid, psid, args = int(parts[0]), int(parts[1]), parts[3] if len(parts) > 3 else ""
        if pid != os.getpid() and (psid == sid or temp in args):
            pids.append(pid)
    return pids


def _kill_cluster(sid: int, temp: str, timeout: float = 10.0) -> None:
    """SIGKILL the cluster's processes (only those: never `ray stop`) until none is left."""
    deadline = time.time() + timeout
    while (pids := _cluster_pids(sid, temp)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)


def _set_driver_auth_env() -> str | None:
    old = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "token"
    if "ray" in sys.modules:      # Ray caches its config: re-read the environment
        from ray._raylet import Config
        Config.initialize("")
    return old


def _restore_driver_auth_env(old: str | None) -> None:
    if old is None:
        os.environ.pop("RAY_AUTH_MODE", None)
    else:
        os.environ["RAY_AUTH_MODE"] = old
    if "ray" in sys.modules:
        from ray._raylet import Config
        Config.initialize("")


def _disconnect_driver(address: str) -> None:
    """ray.shutdown() if this process is connected to the cluster at address."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    try:   # the runtime context reports the head's own IP (not 127.0.0.1): compare ports
        gcs = ray.get_runtime_context().gcs_address
        connected = gcs.rsplit(":", 1)[-1] == address.rsplit(":", 1)[-1]
    except Exception:  # noqa: BLE001 - half-connected: shut down anyway
        connected = True
    if connected:
        ray.shutdown()


@contextlib.contextmanager
def autoscaling_cluster(head_cpus: int = 2, worker_cpus: int = 2, max_workers: int = 2,
                        idle_timeout_minutes: float = 0.5):
    """Start a head whose autoscaler uses the fake multi-node provider (worker type 'cpu_worker'
    with worker_cpus CPUs, min 0, max max_workers); yields the address to pass to
    ray.init(address=...) (or fabric.start(address=...)); shuts everything down on exit.

    The driver needs RAY_AUTH_MODE=token, which this sets in os.environ while the context is
    open (any time before or after `import ray`; see the module docstring). A process already
    connected to a Ray cluster is disconnected (ray.shutdown()) on entry. The
    autoscaler checks for demand every second; a fake worker node joins within ~2-5 s of
    a request_resources() call or a pending actor/task, and an idle one is removed after
    idle_timeout_minutes. Raises RuntimeError if the head does not start."""
    if not os.path.exists(RAY):
        raise RuntimeError("the ray CLI is not installed beside this Python")
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        sys.modules["ray"].shutdown()     # one driver connection per process
    temp = tempfile.mkdtemp(prefix="kvautoscale")
    gcs, dash = free_port(), free_port()
    address = f"127.0.0.1:{gcs}"
    config_path = os.path.join(temp, "autoscaling.json")
    with open(config_path, "w") as f:
        json.dump(autoscaling_config(address, head_cpus, worker_cpus, max_workers,
                                     idle_timeout_minutes), f)
    head_env = {**os.environ, **DRIVER_ENV, "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    cmd = head_command(gcs, free_port(), dash, head_cpus, temp) + [
        "--autoscaling-config", config_path, "--num-gpus", "0",
        "--object-store-memory", str(OBJECT_STORE_BYTES)]
    proc = subprocess.Popen(cmd, env=head_env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    old_auth = None
    auth_set = False
    try:
        try:
            out, _ = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            out, proc.returncode = "timed out", -1
        if proc.returncode != 0:
            raise RuntimeError(f"ray start --head (autoscaling) failed: {out[-2000:]}")
        old_auth, auth_set = _set_driver_auth_env(), True
        yield address   # a plain str: ray.init's Cython code rejects str subclasses
    finally:
        try:
            _disconnect_driver(address)
        finally:
            if auth_set:
                _restore_driver_auth_env(old_auth)
            _kill_cluster(proc.pid, temp)
            shutil.rmtree(temp, ignore_errors=True)
