"""ElasticMoE on an embedded Ray fabric: zero-copy scale-up against a cold start, throughput
while scaling, dropped requests, peak memory during scale-up, expert bytes moved.

    python -m bench.elastic [--quick]

A Mixtral checkpoint of at least 1 GB (float32; --quick: about 0.3 GB) is written to a temporary
directory. The fabric starts with one replica, which reads it once into the node's object store.
Client threads then stream requests without pause while the fabric scales 1 -> 2 (the
throughput window), 2 -> 3 and 3 -> 1 (handing requests off). Prints a table and writes
bench/results/elastic.json. Ratios are measured side by side in one run.

- scaleup_speedup: a cold replica (read the checkpoint from disk, evicted from the page cache
  first; build the model; allocate KV) divided by a zero-copy one (map the node's published
  weights; build; allocate KV), both timed inside the replica, each up to the point where every
  weight page has been touched once: safetensors maps files lazily, so a cold replica reads
  most of the checkpoint only then. `scaleup_speedup_ready_only` stops both clocks when the
  replica says ready (before that first read); `scaleup_speedup_end_to_end` also counts
  starting the actor process (a cold one's against the scale-up's, which adopts a warm standby).
- standby_bring_up_s: `bring_up_s` of the 1 -> 2 scale-up (from the call until the new replica
  is ready), which adopts the node's warm standby (the run waits for it to be ready first);
  `bring_up_s`: the same scale-up under the same load on a second fabric without standbys
  (`instances.standbys: 0`, on the same Ray node, the first one idle), whose new replica is a
  new process that imports torch first.
- throughput_during_scaling_ratio: tokens/s from the start to the end of `fab.scale(2)` over
  tokens/s with one replica just before.
- peak_memory_ratio: peak proportional set size (PSS: shared pages split between the
  processes mapping them, so the object store is counted once) of the whole embedded cluster
  during the 1 -> 2 scale-up, over its steady state with two replicas after it.
- expert_bytes_moved_ratio: bytes of experts the placement planner moved over all events,
  over what a naive re-shard (expert i on device i mod n) would have moved.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import tempfile
import threading
import time

import fabric
from bench.report import print_table, write_json


def model_args(quick: bool):
    from fabric.model.args import ModelArgs

    inter = 640 if quick else 2560            # float32: ~0.3 GB / ~1.1 GB
    return ModelArgs(architecture="MixtralForCausalLM", vocab_size=8192, hidden_size=1024,
                     intermediate_size=inter, num_layers=4, num_heads=8, num_kv_heads=2,
                     head_dim=128, num_experts=8, num_experts_per_tok=2,
                     max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)


def write_checkpoint(path: str, quick: bool) -> int:
    from fabric.model.checkpoint import build_model, random_state_dict, save_checkpoint

    args = model_args(quick)
    save_checkpoint(build_model(args, random_state_dict(args, seed=0)), path)
    return os.path.getsize(os.path.join(path, "model.safetensors"))


# ---- memory: PSS of this process and every descendant (the embedded Ray cluster) -----------
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                kids.setdefault(ppid, []).append(int(pid))
            except (OSError, IndexError, ValueError):
                pass
    return kids


def tree_pss_bytes() -> int:
    kids, todo, total = _children(), [os.getpid()], 0
    while todo:
        pid = todo.pop()
        todo += kids.get(pid, [])
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Pss:"):
                        total += int(line.split()[1]) * 1024
                        break
        except OSError:
            pass
    return total


class MemorySampler:
    def __init__(self, period_s: float = 0.2):
        self.samples: list[tuple[float, int]] = []
        self.period_s, self.stop = period_s, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.samples.append((time.perf_counter(), tree_pss_bytes()))
            time.sleep(self.period_s)

    def between(self, t0: float, t1: float) -> list[int]:
        return [b for t, b in self.samples if t0 <= t <= t1]


# ---- load: closed-loop streaming clients, every token timestamped ------------------------
class Clients:
    def __init__(self, fab, n: int, max_new_tokens: int, vocab: int):
        self.fab, self.n, self.max_new = fab, n, max_new_tokens
        self.vocab = vocab
        self.token_times: list[float] = []
        self.submitted = self.completed = 0
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int):
        rng = random.Random(i)
        while not self.stop.is_set():
            prompt = [rng.randrange(3, self.vocab) for _ in range(rng.randrange(24, 64))]
            with self.lock:
                self.submitted += 1
            got = 0
            try:
                for _ in self.fab.stream(prompt, max_new_tokens=self.max_new, ignore_eos=True):
                    got += 1
                    with self.lock:
                        self.token_times.append(time.perf_counter())
            except Exception as e:   # noqa: BLE001 - counted as dropped
                self.failures.append(repr(e))
                continue
            with self.lock:
                if got == self.max_new:
                    self.completed += 1
                else:
                    self.failures.append(f"{got} of {self.max_new} tokens")

    def start(self):
        for t in self.threads:
            t.start()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(600)

    def rate(self, t0: float, t1: float) -> float:
        with self.lock:
            n = sum(t0 <= t <= t1 for t in self.token_times)
        return n / max(t1 - t0, 1e-9)


def evict_from_page_cache(path: str) -> None:
    """Drop the checkpoint's pages from the OS page cache, so a cold start reads the disk."""
    for name in os.listdir(path):
        fd = os.open(os.path.join(path, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cold_replica(fab, path: str) -> tuple[float, dict]:
    """A replica as a cold start builds it: a fresh actor that reads the checkpoint from disk
    (evicted from the page cache first), builds the model and allocates KV; then reads every
    weight once, as its first forward pass would (safetensors maps files lazily)."""
    import ray

    from actors.launch import new_instance
    from fabric.api import NAMESPACE

    evict_from_page_cache(path)
    t0 = time.perf_counter()
    actor = new_instance(fab.cfg, 99, None, f"kvfabric-{fab.name}-controller", NAMESPACE,
                         fab.name, False)
    ray.get(actor.info.remote())
    end_to_end = time.perf_counter() - t0
    report = ray.get(actor.weights_report.remote())
    report["touch_s"] = ray.get(actor.touch_weights.remote())
    ray.kill(actor)
    return end_to_end, report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    opts = ap.parse_args()
    q = opts.quick
    steady_s, clients_n, max_new = (4.0, 3, 24) if q else (8.0, 4, 32)
    tmp = tempfile.mkdtemp(prefix="kvfabric-elastic-")
    try:
        ckpt_bytes = write_checkpoint(tmp, q)
        cfg = {"model": {"path": tmp},
               "instances": {"count": 1, "kv_blocks": 128, "block_size": 16,
                             "max_batch_tokens": 256, "num_cpus": 1}}
        fab = fabric.start(cfg)
        try:
            result = run(fab, tmp, ckpt_bytes, steady_s, clients_n, max_new)
            cold = cold_scale_up(cfg, steady_s, clients_n, max_new)   # on the same Ray node
        finally:
            fab.shutdown()
        result |= {"bring_up_s": cold["bring_up_s"],
                   "standby_speedup": cold["bring_up_s"] / result["standby_bring_up_s"],
                   "cold_scale_up": cold}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["quick"] = q
    rows = [(k, v if not isinstance(v, float) else f"{v:.3g}", GOALS.get(k, "")) for k, v in
            result.items() if not isinstance(v, (dict, list))]
    print_table(["metric", "value", "goal"], rows)
    write_json("elastic", result)


GOALS = {"scaleup_speedup": ">= 9", "standby_bring_up_s": "< 1", "throughput_during_scaling_ratio": ">= 0.9",
         "dropped_requests": "0", "peak_memory_ratio": "<= 1.1",
         "expert_bytes_moved_ratio": "< 1", "checkpoint_gb": ">= 1"}


def cold_scale_up(cfg: dict, steady_s: float, clients_n: int, max_new: int) -> dict:
    """The 1 -> 2 scale-up event of a second fabric, without standbys, under the same load."""
    fab = fabric.start(cfg | {"instances": cfg["instances"] | {"standbys": 0}})
    try:
        clients = Clients(fab, clients_n, max_new, 8192)
        clients.start()
        time.sleep(steady_s / 2)
        up = fab.scale(2)
        clients.finish()
        return up
    finally:
        fab.shutdown()


def wait_for_standby(fab, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not any(s["state"] == "ready" for s in fab.stats()["elastic"]["standbys"]):
        if time.monotonic() > deadline:
            raise RuntimeError("no warm standby became ready")
        time.sleep(0.2)


def run(fab, path: str, ckpt_bytes: int, steady_s: float, clients_n: int, max_new: int) -> dict:
    import ray

    mem = MemorySampler()
    mem.thread.start()
    clients = Clients(fab, clients_n, max_new, 8192)
    clients.start()
    time.sleep(steady_s / 4)                           # warm-up
    cold_e2e, cold = cold_replica(fab, path)           # under the same load as the scale-up
    time.sleep(steady_s / 4)
    wait_for_standby(fab)
    t_before = time.perf_counter()
    time.sleep(steady_s)
    t_up = time.perf_counter()
    up = fab.scale(2)
    t_up_end = time.perf_counter()
    zero_touch_s = ray.get(fab.instances[1].touch_weights.remote())
    zero_report = ray.get(fab.instances[1].weights_report.remote())
    time.sleep(steady_s)
    t_after = time.perf_counter()
    more = fab.scale(3)
    time.sleep(steady_s / 2)
    down = fab.scale(1)
    time.sleep(1.0)
    clients.finish()
    mem.stop.set()
    elastic = fab.stats()["elastic"]
    before, during = clients.rate(t_before, t_up), clients.rate(t_up, t_up_end)
    after = clients.rate(t_up_end, t_after)
    steady_after = mem.between(t_up_end + 1.0, t_after)
    steady_before = mem.between(t_before, t_up)
    peak = max(mem.between(t_up, t_up_end + 1.0))
    expert = elastic["expert_bytes_moved"]
    cold_s = cold["ready_s"] + cold["touch_s"]
    zero_copy_s = up["replica_ready_s"] + zero_touch_s
    return {
        "checkpoint_gb": ckpt_bytes / 1e9,
        "scaleup_speedup": cold_s / zero_copy_s,
        "cold_replica_s": cold_s, "zero_copy_replica_s": zero_copy_s,
        "scaleup_speedup_ready_only": cold["ready_s"] / up["replica_ready_s"],
        "cold_ready_s": cold["ready_s"], "zero_copy_ready_s": up["replica_ready_s"],
        "cold_first_read_s": cold["touch_s"], "zero_copy_first_read_s": zero_touch_s,
        "scaleup_speedup_end_to_end": (cold_e2e + cold["touch_s"]) / (up["bring_up_s"] + zero_touch_s),
        "cold_actor_ready_s": cold_e2e, "zero_copy_actor_ready_s": up["bring_up_s"],
        "standby_bring_up_s": up["bring_up_s"], "standby_used": up["warm_replicas"] == 1,
        "scale_1_to_2_s": up["seconds"], "data_plane_pause_s": up["pause_s"],
        "throughput_before_tok_s": before, "throughput_during_tok_s": during,
        "throughput_after_tok_s": after,
        "throughput_during_scaling_ratio": during / before if before else 0.0,
        "dropped_requests": clients.submitted - clients.completed,
        "requests_completed": clients.completed,
        "peak_memory_ratio": peak / (sum(steady_after) / len(steady_after)),
        "peak_over_one_replica_ratio": peak / (sum(steady_before) / len(steady_before)),
        "peak_memory_gb": peak / 1e9,
        "bytes_loaded_from_disk_on_scaleup": up["bytes_loaded_from_disk"],
        "bytes_mapped_on_scaleup": up["bytes_mapped"],
        "scale_3_to_1_requests_moved": down["requests_moved"],
        "scale_3_to_1_requests_recomputed": down["requests_recomputed"],
        "scale_3_to_1_s": down["seconds"],
        "expert_bytes_moved_ratio": expert["planner"] / expert["naive"] if expert["naive"] else 1.0,
        "events": [up, more, down], "cold_replica": cold,
        "zero_copy_replica": zero_report, "failures": clients.failures[:10],
    }


if __name__ == "__main__":
    main()
