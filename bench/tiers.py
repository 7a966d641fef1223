"""KV tiers on an embedded Ray fabric (SmolLM2-135M-Instruct, float32, one instance): a
multi-turn chat workload whose KV is several times the pool, served five ways.

    python -m bench.tiers [--quick]

Prints a table and writes bench/results/tiers.json. Ratios are measured side by side in one
run; absolute times on CPU say little.

Workload: `sessions` chat sessions, each a thread that sends `turns` turns one after another
with a think time between them (seeded, exponential, `think_s` mean); turn k's prompt is the
whole conversation so far plus a new user message (`bench/workloads.py` ids). The sessions
start staggered, a few are active at a time (the pool holds their working set), and while one
thinks the others run and push its KV out of the pool (all sessions' KV is several times it). Every
turn is streamed; its TTFT is the driver's, from sending to the first token (it includes any
lookup or load of the tiers).

Arms (each a fresh fabric, warmed up, with an empty cache):
- `recompute`: the prefix cache alone (no tiers): what left the pool is recomputed.
- `load`: host and disk tiers, `tiers.prefill: load` (all blocks below come up first).
- `compute_or_load`: the same tiers, `prefill: compute_or_load` (compute from the head while
  the loader brings blocks from the tail).
- `auto`: the same tiers, `prefill: auto` (chosen per request by measured speeds).
- `recompute_ttl`, `compute_or_load_ttl`: as `recompute` and `compute_or_load`, and every turn
  names its session with `ttl_s` = `ttl_s`, so its KV stays in the pool between turns.

Per arm: TTFT p50/p90, generated tokens/s over the wall time, prompt tokens cached (pool or
tier), hits and bytes per tier, how turns brought their prefix up. The JSON carries
`compute_or_load_vs_recompute_ttft`, `compute_or_load_vs_load_ttft` and `ttl_vs_no_ttl_ttft`
(p50 TTFT ratios: compute-or-load over recompute and over load; with TTL over without, both
with the tiers), and `ttl_vs_no_ttl_ttft_without_tiers` (recompute_ttl over recompute).
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import threading
import time

import fabric
from bench import workloads
from bench.peers.vllm_runner import percentile
from bench.report import print_table, write_json

MODEL = {"preset": "smollm2-135m-instruct", "dtype": "float32"}
BLOCK_SIZE = 16
BLOCK_BYTES = 2 * 30 * BLOCK_SIZE * 3 * 64 * 4      # SmolLM2: 30 layers, 3 KV heads of 64
ARMS = ("recompute", "recompute_ttl", "load", "compute_or_load", "auto", "compute_or_load_ttl")
SIZES = {
    "quick": dict(sessions=8, turns=3, first_tokens=256, turn_tokens=48, gen_tokens=16,
                  think_s=8.0, kv_blocks=64, ttl_s=30.0),
    "full": dict(sessions=16, turns=4, first_tokens=512, turn_tokens=64, gen_tokens=32,
                 think_s=12.0, kv_blocks=128, ttl_s=60.0),
}


def config(arm: str, size: dict, disk_path: str) -> dict:
    cfg = {"model": MODEL,
           "instances": {"count": 1, "kv_blocks": size["kv_blocks"], "block_size": BLOCK_SIZE,
                         "max_batch_tokens": 256}}
    if not arm.startswith("recompute"):
        total = size["sessions"] * (size["first_tokens"] + size["turns"] *
                                    (size["turn_tokens"] + size["gen_tokens"])) // BLOCK_SIZE
        cfg["tiers"] = {"host_bytes": total // 2 * BLOCK_BYTES,        # half fits in host ...
                        "disk_path": disk_path, "disk_bytes": 4 * total * BLOCK_BYTES,  # ... all on disk
                        "prefill": "compute_or_load" if arm.startswith("compute_or_load") else arm}
    return cfg


def warm_up(fab) -> None:
    prompt = [fab.vocab_size - 1 - i for i in range(64)]
    fab.generate([prompt], max_new_tokens=4, ignore_eos=True)
    fab.reset_prefix_cache()


def session(fab, sid: int, messages: list[list[int]], size: dict, ttl: bool, out: list) -> None:
    rng = random.Random(1000 + sid)
    time.sleep(sid * size["think_s"] / 4)                      # staggered starts
    history: list[int] = []
    extra = {"session_id": f"s{sid}", "ttl_s": size["ttl_s"]} if ttl else {}
    for turn, msg in enumerate(messages):
        prompt = workloads.next_prompt(history, msg)
        t0 = time.perf_counter()
        first, tokens, metrics = None, [], {}
        for ev in fab.stream(prompt, max_new_tokens=size["gen_tokens"], ignore_eos=True,
                             output="events", **extra):
            if "token" in ev:
                first = first or time.perf_counter()
                tokens.append(ev["token"])
            else:
                metrics = ev["metrics"]
        out.append({"session": sid, "turn": turn, "ttft_s": (first or time.perf_counter()) - t0,
                    "prompt_tokens": len(prompt), "tokens": tokens, **metrics})
        history = prompt + tokens
        time.sleep(rng.expovariate(1.0 / size["think_s"]))


def run_arm(arm: str, size: dict, work: dict) -> tuple[dict, list[list[int]]]:
    disk = tempfile.mkdtemp(prefix="kvfabric-tiers-")
    try:
        with fabric.start(config(arm, size, disk)) as fab:
            warm_up(fab)
            before = fab.stats()["tiers"]
            turns: list[dict] = []
            threads = [threading.Thread(target=session, args=(fab, i, msgs, size,
                                                              arm.endswith("_ttl"), turns))
                       for i, msgs in enumerate(work["sessions"])]
            t0 = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
            after = fab.stats()
    finally:
        shutil.rmtree(disk, ignore_errors=True)
    later = [t for t in turns if t["turn"] > 0]            # first turns find nothing cached
    ttfts = [t["ttft_s"] for t in later]
    tiers = after["tiers"]
    per_tier = {name: {k: (tiers[name] or {}).get(k, 0) - (before[name] or {}).get(k, 0)
                       for k in ("hits", "bytes_up", "bytes_down")}
                for name in ("host", "disk") if tiers.get(name)}
    policies: dict[str, int] = {}
    for t in later:
        p = t.get("tier_policy", "none")
        policies[p] = policies.get(p, 0) + 1
    generated = sum(len(t["tokens"]) for t in turns)
    pc = after["prefix_cache"]
    row = {"arm": arm, "seconds": seconds, "tokens_per_s": generated / seconds,
           "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
           "num_turns": len(turns), "prompt_tokens": sum(t["prompt_tokens"] for t in later),
           "cached_tokens": sum(t.get("cached_tokens", 0) for t in later),
           "tier_loaded_tokens": sum(t.get("tier_loaded_tokens", 0) for t in later),
           "tier_computed_tokens": sum(t.get("tier_computed_tokens", 0) for t in later),
           "policies": policies, "tiers": per_tier,
           "pool_evictions": sum(p["evictions"] for p in pc["instances"].values()),
           "session_evictions_under_pressure": sum(
               p.get("session_evictions_under_pressure", 0) for p in pc["instances"].values())}
    order = sorted(turns, key=lambda t: (t["session"], t["turn"]))
    return row, [t["tokens"] for t in order]


def ratio(rows: dict, a: str, b: str) -> float | None:
    x, y = rows[a]["ttft_p50_s"], rows[b]["ttft_p50_s"]
    return x / y if x is not None and y else None


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller workload")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    args = ap.parse_args(argv)
    size = SIZES["quick" if args.quick else "full"]
    work = workloads.multi_turn(num_sessions=size["sessions"], turns=size["turns"],
                                first_tokens=size["first_tokens"],
                                turn_tokens=size["turn_tokens"], gen_tokens=size["gen_tokens"])
    rows, outputs = {}, {}
    for arm in [a for a in args.arms.split(",") if a]:
        if arm not in ARMS:
            raise SystemExit(f"unknown arm {arm!r} (known: {', '.join(ARMS)})")
        rows[arm], outputs[arm] = run_arm(arm, size, work)
        print(f"{arm}: p50 TTFT {rows[arm]['ttft_p50_s']:.3f} s", flush=True)
    base = next(iter(outputs.values()))
    result = {
        "size": "quick" if args.quick else "full", "workload": size,
        "pool_tokens": size["kv_blocks"] * BLOCK_SIZE,
        "total_kv_tokens": size["sessions"] * (size["first_tokens"] + size["turns"] *
                                               (size["turn_tokens"] + size["gen_tokens"])),
        "arms": rows,
        "outputs_match": {a: o == base for a, o in outputs.items()},
        "compute_or_load_vs_recompute_ttft":
            ratio(rows, "compute_or_load", "recompute") if {"compute_or_load", "recompute"} <= set(rows) else None,
        "compute_or_load_vs_load_ttft":
            ratio(rows, "compute_or_load", "load") if {"compute_or_load", "load"} <= set(rows) else None,
        "auto_vs_recompute_ttft":
            ratio(rows, "auto", "recompute") if {"auto", "recompute"} <= set(rows) else None,
        "ttl_vs_no_ttl_ttft":
            ratio(rows, "compute_or_load_ttl", "compute_or_load")
            if {"compute_or_load_ttl", "compute_or_load"} <= set(rows) else None,
        "ttl_vs_no_ttl_ttft_without_tiers":
            ratio(rows, "recompute_ttl", "recompute") if {"recompute_ttl", "recompute"} <= set(rows) else None,
    }
    print_table(["arm", "TTFT p50 s", "TTFT p90 s", "tok/s", "cached/prompt", "loaded",
                 "computed below", "host hits", "disk hits", "policies"],
                [(a, f"{r['ttft_p50_s']:.3f}", f"{r['ttft_p90_s']:.3f}", f"{r['tokens_per_s']:.1f}",
                  f"{r['cached_tokens']}/{r['prompt_tokens']}", r["tier_loaded_tokens"],
                  r["tier_computed_tokens"], r["tiers"].get("host", {}).get("hits", "-"),
                  r["tiers"].get("disk", {}).get("hits", "-"), r["policies"])
                 for a, r in rows.items()])
    for k in ("compute_or_load_vs_recompute_ttft", "compute_or_load_vs_load_ttft",
              "auto_vs_recompute_ttft", "ttl_vs_no_ttl_ttft", "ttl_vs_no_ttl_ttft_without_tiers"):
        v = result[k]
        print(f"{k}: {'-' if v is None else f'{v:.3f}'}")
    print("outputs identical across arms:", result["outputs_match"])
    print("wrote", write_json("tiers", result))
    return result


if __name__ == "__main__":
    main()
