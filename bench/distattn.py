"""DistKV-LLM / DistAttention on an embedded Ray fabric: capacity, split-KV step time, bytes on
the wire, throughput with and without lending, control calls per token.

    python -m bench.distattn [--quick]

Prints a table and writes bench/results/distattn.json. Ratios are measured side by side in one
run; absolute times on CPU say little.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

import fabric
from bench.report import print_table, write_json


def base_config(count: int, kv_blocks: int, block_size: int, lending: bool = True) -> dict:
    return {"model": {"preset": "tiny-llama"},
            "instances": {"count": count, "kv_blocks": kv_blocks, "block_size": block_size,
                          "max_batch_tokens": 512},
            "lending": {"enabled": lending}}


def prompt_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def home_detail(fab, home: int) -> dict:
    return fab.stats()["instances"][home]["detail"]


def capacity(fab, n_new: int) -> tuple[int, float]:
    """Serve the longest request the fabric admits; returns (tokens, seconds)."""
    total = fab.max_request_blocks * fab.block_size
    prompt = prompt_of(random.Random(1), total - n_new)
    t0 = time.perf_counter()
    res = fab.generate([prompt], max_new_tokens=n_new, ignore_eos=True)[0]
    assert len(res.tokens) == n_new
    return total, time.perf_counter() - t0


def decode_profile(fab, prompt: list[int], short: int, long: int) -> dict:
    """Per-decode-token cost from two runs of the same prompt (difference removes the prefill)."""
    runs = []
    for n in (short, long):
        home = fab._next_home
        before = home_detail(fab, home)
        t0 = time.perf_counter()
        res = fab.generate([prompt], max_new_tokens=n, ignore_eos=True)[0]
        seconds = time.perf_counter() - t0
        after = home_detail(fab, home)
        sent = after["transport"].get("bytes_sent", 0) - before["transport"].get("bytes_sent", 0)
        recv = after["transport"].get("bytes_received", 0) - before["transport"].get("bytes_received", 0)
        runs.append({"seconds": seconds, "bytes": sent + recv, "tpot_s": res.metrics["tpot_s"],
                     "controller_calls": after["controller_calls"] - before["controller_calls"]})
    n = long - short
    return {"tpot_s": runs[1]["tpot_s"],
            "bytes_per_token": (runs[1]["bytes"] - runs[0]["bytes"]) / n,
            "controller_calls_per_token": (runs[1]["controller_calls"] - runs[0]["controller_calls"]) / n}


def kv_bytes_per_token(fab) -> int:
    i = fab.infos[0]
    return 2 * i["num_layers"] * i["num_kv_heads"] * i["head_dim"] * i["dtype_bytes"]


def workload(seed: int, n: int, instance_tokens: int) -> list[tuple[float, list[int], int]]:
    """BurstGPT-like: gamma inter-arrivals, Zipf prompt/output lengths with a long-context tail."""
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        t += rng.gammavariate(0.5, 0.1)
        if rng.random() < 0.2:
            plen = int(instance_tokens * rng.uniform(1.1, 2.2))
        else:
            plen = min(int(16 * rng.paretovariate(1.2)), instance_tokens // 2)
        olen = min(int(8 * rng.paretovariate(1.5)), 48)
        out.append((t, prompt_of(rng, plen), olen))
    return out


def replay(fab, trace) -> dict:
    """Submit each request at its arrival time from its own thread; tokens/s over the makespan."""
    done, rejected, lock = [], [], threading.Lock()

    def one(at, prompt, olen, t0):
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        try:
            r = fab.generate([prompt], max_new_tokens=olen, ignore_eos=True)[0]
            with lock:
                done.append((len(prompt), len(r.tokens)))
        except fabric.CapacityError:
            with lock:
                rejected.append(len(prompt))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(*req, t0)) for req in trace]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    prompt_tokens, output_tokens = sum(p for p, _ in done), sum(o for _, o in done)
    return {"seconds": seconds, "served": len(done), "rejected": len(rejected),
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
            "tokens_per_s": (prompt_tokens + output_tokens) / seconds,
            "output_tokens_per_s": output_tokens / seconds}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, under 3 minutes on 2 cores")
    args = ap.parse_args(argv)
    kv_blocks, block = (48, 16) if args.quick else (80, 16)   # 3 x 80 x 16 < 4096 positions
    n_new = 16 if args.quick else 32
    n_requests = 16 if args.quick else 48
    instance_tokens = kv_blocks * block
    fabric_tokens = 3 * instance_tokens
    import ray

    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        with fabric.start(base_config(3, kv_blocks, block)) as fab:
            served, cap_s = capacity(fab, n_new)
            context = int(0.9 * fabric_tokens) - n_new
            prompt = prompt_of(random.Random(2), context)
            split = decode_profile(fab, prompt, 4, 4 + n_new)
            per_token = kv_bytes_per_token(fab)
            remote_tokens = context - instance_tokens
            lend = replay(fab, workload(3, n_requests, instance_tokens))
        with fabric.start(base_config(1, 3 * kv_blocks, block)) as fab:
            local = decode_profile(fab, prompt, 4, 4 + n_new)
        with fabric.start(base_config(3, kv_blocks, block, lending=False)) as fab:
            no_lend = replay(fab, workload(3, n_requests, instance_tokens))
    finally:
        ray.shutdown()
    result = {
        "capacity_ratio": served / fabric_tokens,
        "split_step_ratio": split["tpot_s"] / local["tpot_s"],
        "wire_bytes_ratio": split["bytes_per_token"] / (remote_tokens * per_token),
        "throughput_ratio": lend["tokens_per_s"] / max(no_lend["tokens_per_s"], 1e-9),
        "output_throughput_ratio": lend["output_tokens_per_s"] / max(no_lend["output_tokens_per_s"], 1e-9),
        "controller_calls_per_token": split["controller_calls_per_token"],
        "detail": {"instances": 3, "kv_blocks": kv_blocks, "block_size": block,
                   "longest_served_tokens": served, "fabric_kv_tokens": fabric_tokens,
                   "longest_request_seconds": cap_s, "split_context": context,
                   "tpot_split_s": split["tpot_s"], "tpot_local_s": local["tpot_s"],
                   "wire_bytes_per_token": split["bytes_per_token"],
                   "remote_kv_bytes_per_step": remote_tokens * per_token,
                   "with_lending": lend, "without_lending": no_lend, "quick": args.quick},
    }
    rows = [("capacity_ratio", result["capacity_ratio"], ">= 0.95 (one instance alone: 0.33)"),
            ("split_step_ratio", result["split_step_ratio"], "<= 1.15 on a GPU"),
            ("wire_bytes_ratio", result["wire_bytes_ratio"], "<< 1"),
            ("throughput_ratio", result["throughput_ratio"], ">= 2.0 (prompt+output tokens/s)"),
            ("output_throughput_ratio", result["output_throughput_ratio"], "(generated tokens/s)"),
            ("controller_calls_per_token", result["controller_calls_per_token"], "about 0")]
    print_table(["metric", "value", "goal"], [(m, f"{v:.4f}", g) for m, v, g in rows])
    print(f"with lending: {lend}\nwithout lending: {no_lend}")
    write_json("distattn", result)
    return result


if __name__ == "__main__":
    main()
