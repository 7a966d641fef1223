"""DistKV-LLM / DistAttention on an embedded Ray fabric: capacity, split-KV step time, bytes on
the wire, throughput with and without lending, control calls per token.

    python -m bench.distattn [--quick]

Prints a table and writes bench/results/distattn.json. Ratios are measured side by side in one
run; absolute times on CPU say little.

Control calls are counts over counts, never differences between runs (so never negative):
`controller_calls_per_token` is every call the instances made to the controller during two
requests (mostly borrowing at their admission) over the tokens those requests generated;
`controller_calls_per_decode_token` counts only the calls made while one request decodes.
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
            "lending": {"enabled": lending},
            "prefix_cache": {"routing": False}}     # homes are chosen (`_next_home`)


def prompt_of(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def home_detail(fab, home: int) -> dict:
    return next(s["detail"] for s in fab.stats()["instances"] if s["id"] == home)


def grew(before: int, after: int) -> int:
    """How much a counter of an instance grew between two readings, never negative: a counter
    that went back was started again (its instance or transport was rebuilt), and all it
    counts came since."""
    return after - before if after >= before else after


def controller_calls(fab) -> dict[int, int]:
    """Each live instance's count of its own calls to the controller (borrow proposals), by
    instance id."""
    return {s["id"]: s["detail"]["controller_calls"] for s in fab.stats()["instances"]}


def calls_between(before: dict[int, int], after: dict[int, int]) -> int:
    """Controller calls made between two `controller_calls` readings: summed over the instances
    of the later one, matched by id (an instance that joined in between counts from 0)."""
    return sum(grew(before.get(i, 0), n) for i, n in after.items())


def capacity(fab, n_new: int) -> tuple[int, float]:
    """Serve the longest request the fabric admits; returns (tokens, seconds)."""
    total = fab.max_request_blocks * fab.block_size
    prompt = prompt_of(random.Random(1), total - n_new)
    t0 = time.perf_counter()
    res = fab.generate([prompt], max_new_tokens=n_new, ignore_eos=True)[0]
    assert len(res.tokens) == n_new
    return total, time.perf_counter() - t0


def decode_profile(fab, prompt: list[int], short: int, long: int) -> dict:
    """Per-decode-token cost from two runs of the same prompt (difference removes the prefill),
    and the controller calls of both runs per token they generated."""
    runs = []
    for n in (short, long):
        home = fab._next_home
        before, calls_before = home_detail(fab, home), controller_calls(fab)
        t0 = time.perf_counter()
        res = fab.generate([prompt], max_new_tokens=n, ignore_eos=True)[0]
        seconds = time.perf_counter() - t0
        after, calls_after = home_detail(fab, home), controller_calls(fab)
        sent, recv = (grew(before["transport"].get(k, 0), after["transport"].get(k, 0))
                      for k in ("bytes_sent", "bytes_received"))
        runs.append({"seconds": seconds, "bytes": sent + recv, "tpot_s": res.metrics["tpot_s"],
                     "tokens": len(res.tokens),
                     "controller_calls": calls_between(calls_before, calls_after)})
    n = long - short
    # Not a difference between the runs: how often the home borrows (and so calls the
    # controller) varies from run to run, so "long run minus short run" could be negative.
    calls = sum(r["controller_calls"] for r in runs)
    return {"tpot_s": runs[1]["tpot_s"],
            "bytes_per_token": (runs[1]["bytes"] - runs[0]["bytes"]) / n,
            "controller_calls": calls, "generated_tokens": sum(r["tokens"] for r in runs),
            "controller_calls_per_token": calls / max(1, sum(r["tokens"] for r in runs))}


def decode_calls(fab, prompt: list[int], n: int) -> dict:
    """Controller calls while one request decodes (from its first token to its last), per token
    generated meanwhile: the steady-decode share, without the borrowing done at admission."""
    stream = fab.stream(prompt, max_new_tokens=n, ignore_eos=True)
    next(stream)
    calls_before, generated_before = controller_calls(fab), generated(fab)
    rest = sum(1 for _ in stream)
    calls, tokens = calls_between(calls_before, controller_calls(fab)), \
        sum(grew(generated_before.get(i, 0), g) for i, g in generated(fab).items())
    assert rest == n - 1
    return {"controller_calls": calls, "tokens": tokens,
            "controller_calls_per_token": calls / max(1, tokens)}


def generated(fab) -> dict[int, int]:
    return {s["id"]: s["detail"]["num_generated"] for s in fab.stats()["instances"]}


def kv_bytes_per_token(fab) -> int:
    i = fab.info
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
            steady = decode_calls(fab, prompt, 4 + n_new)
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
        "controller_calls_per_decode_token": steady["controller_calls_per_token"],
        "detail": {"controller_calls": split["controller_calls"],
                   "controller_calls_tokens": split["generated_tokens"],
                   "decode_controller_calls": steady["controller_calls"],
                   "decode_tokens": steady["tokens"],
                   "instances": 3, "kv_blocks": kv_blocks, "block_size": block,
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
            ("controller_calls_per_token", result["controller_calls_per_token"],
             "(admission borrows / generated tokens)"),
            ("controller_calls_per_decode_token", result["controller_calls_per_decode_token"],
             "about 0")]
    print_table(["metric", "value", "goal"], [(m, f"{v:.4f}", g) for m, v, g in rows])
    print(f"with lending: {lend}\nwithout lending: {no_lend}")
    write_json("distattn", result)
    return result


if __name__ == "__main__":
    main()
