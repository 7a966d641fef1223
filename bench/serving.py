"""Serving throughput against vLLM's CPU build on the same cores (SmolLM2-135M-Instruct,
float32, prefix caching off on both): generated tokens/s, TTFT and TPOT, one request alone,
and bench.distattn's split-step ratio.

    python -m bench.serving [--quick] [--no-peers]

Prints a table and writes bench/results/serving.json. Ratios are measured side by side in one
run; absolute times on CPU say little, and other work on the same cores moves them: the load
average is recorded before, at the start of every arm, and after.

Workloads (`workloads.SERVING`, the same token ids for both engines): `fixed` (default 32
requests of 256 prompt + 64 generated tokens, `--quick` 8 x (128 + 32), all at once),
`burstgpt` (gamma arrivals, Zipf-like lengths; each request sent at its arrival time, those
with the same time in one call) and `one_request` (128 + 128, quick 64 + 64, alone). Decoding
is greedy with `ignore_eos`. Per run: generated tokens/s (all generated tokens over the wall
time, from the first submission to the last answer), and over requests p50/p90 TTFT (the
instance's, from the request's arrival there to its first token) and TPOT (seconds per output
token after the first). `decode_tok_s` of one_request is 1 / its TPOT.

Fabric arms: 1 and 2 instances on this machine (`instances.count`; `instances.num_cpus` left
to its default, so one instance takes both cores and two take one each), blocks of 16, no
warm standby (nothing scales here). Each arm is one fabric for all three workloads, warmed by
one short request per instance first. vLLM (skipped with `--no-peers`, or when
`.venv-peers/bin/python` is missing or fails): one `bench/peers/vllm_runner.py` process for
all three workloads, after every fabric is shut down, requests added to its engine at their
arrival times (`arrivals: true`), blocks of 32 (vLLM's CPU attention takes multiples of 32
only, so 16 is refused). vLLM's scheduler keeps its CPU defaults (256 sequences, 4096 tokens
per step); the fabric runs with the same 4096 tokens per step (and 32 sequences, all a run
has).

`throughput_vs_vllm`: the best fabric arm's tokens/s on `fixed` over vLLM's;
`one_request_vs_vllm`: the best arm's one-request decode tokens/s over vLLM's (both null
without vLLM). `split_step_ratio`: a decode step with the KV over 3 instances over one with it
all local (tiny-llama, bench.distattn's `--quick` sizes): the median TPOT of `SPLIT_RUNS`
requests on each fabric, since one run of a few-millisecond step moves several-fold with
whatever else the two cores run.
`outputs_match`: per workload, how many requests' outputs differ between the arms and between
the 1-instance arm and vLLM.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import tempfile
import threading
import time
from collections import Counter

import fabric
from bench import distattn, workloads
from bench.peers.vllm_runner import serving_figures
from bench.prefix import BLOCK_SIZE, MODEL, PEER_PYTHON, PEER_TIMEOUT_S, ROOT, VOCAB_SIZE, \
    hf_model_dir
from bench.report import print_table, write_json

ARMS = (1, 2)                   # fabric instances
KV_BLOCKS = 1200                # per instance: a whole fixed batch on one instance
MAX_BATCH_TOKENS = 4096         # vLLM's CPU default: both schedulers take the same step budget
VLLM_BLOCK_SIZE = 32            # the smallest vLLM's CPU attention takes
NAMES = ("fixed", "one_request", "burstgpt")
DROP = ("outputs",)             # per-request outputs are compared, not stored
SPLIT_RUNS, SPLIT_NEW_TOKENS = 5, 36
GOALS = {"throughput_vs_vllm": ">= 1.3", "one_request_vs_vllm": ">= 1.0",
         "split_step_ratio": "<= 1.5"}


def config(count: int) -> dict:
    """A SmolLM2 fabric of `count` instances with the prefix cache off."""
    return {"model": MODEL,
            "instances": {"count": count, "kv_blocks": KV_BLOCKS, "block_size": BLOCK_SIZE,
                          "max_batch_tokens": MAX_BATCH_TOKENS, "standbys": 0},
            "prefix_cache": {"enabled": False}}


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, as `uptime` prints them."""
    return [round(x, 2) for x in os.getloadavg()]


def warm_up(fab, count: int) -> None:
    """One short request per instance (ids no workload draws) before any clock starts."""
    prompt = [fab.vocab_size - 1 - i for i in range(64)]
    fab.generate([prompt] * count, max_new_tokens=4, ignore_eos=True)


def serve(fab, workload: dict) -> list[fabric.Result]:
    """Send `workload`'s requests at their arrival times, those arriving together in one
    `submit` (so `fixed` is one call of all), each group from its own thread."""
    groups: dict[float, list[int]] = {}
    reqs = workloads.requests(workload)
    for i, (at, _, _) in enumerate(reqs):
        groups.setdefault(at, []).append(i)
    results: list = [None] * len(reqs)

    def send(at: float, idx: list[int], t0: float) -> None:
        time.sleep(max(0.0, t0 + at - time.perf_counter()))
        out = fab.submit([{"prompt": reqs[i][1], "max_new_tokens": reqs[i][2],
                           "ignore_eos": True} for i in idx])
        for i, r in zip(idx, out):
            results[i] = r

    t0 = time.perf_counter()
    threads = [threading.Thread(target=send, args=(at, idx, t0)) for at, idx in groups.items()]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    if any(r is None for r in results):
        raise RuntimeError(f"{workload['name']}: a request got no answer (see the thread's error)")
    return results


def run_workload(fab, count: int, workload: dict) -> dict:
    """One serving workload on a warm fabric: its row (with the outputs)."""
    load = load_average()
    t0 = time.perf_counter()
    results = serve(fab, workload)
    seconds = time.perf_counter() - t0
    served = [{"tokens": r.tokens, "ttft_s": r.metrics["ttft_s"],
               "latency_s": r.metrics["latency_s"]} for r in results]
    return {"engine": "kv-fabric", "instances": count, "workload": workload["name"],
            **serving_figures(served, seconds), "arrivals": True,
            "prompt_tokens": sum(map(len, workload["prompts"])),
            "homes": dict(Counter(r.home for r in results)),
            "num_cpus_per_instance": fab.cfg.instances.num_cpus, "load_average": load}


def fabric_runs(loads: list[dict]) -> list[dict]:
    """Every workload on each fabric arm, one fabric (its own embedded Ray) per arm."""
    rows = []
    for count in ARMS:
        with fabric.start(config(count)) as fab:
            if fab.vocab_size != VOCAB_SIZE:
                raise RuntimeError(f"model vocabulary {fab.vocab_size}, expected {VOCAB_SIZE}")
            warm_up(fab, count)
            rows += [run_workload(fab, count, w) for w in loads]
    return rows


def split_step() -> dict:
    """The split-step ratio: per-token decode time of one request whose KV spans 3 instances
    over that of the same request on one instance, each the median of `SPLIT_RUNS` runs."""
    import ray

    kv_blocks, block = 48, 16
    prompt = distattn.prompt_of(random.Random(2),
                                int(0.9 * 3 * kv_blocks * block) - SPLIT_NEW_TOKENS)
    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             configure_logging=False)          # as bench.distattn: 2 Ray CPUs per instance
    runs = {}
    try:
        for name, count, blocks in (("split", 3, kv_blocks), ("local", 1, 3 * kv_blocks)):
            with fabric.start(distattn.base_config(count, blocks, block)) as fab:
                fab.generate([prompt], max_new_tokens=4, ignore_eos=True)       # warm
                runs[name] = [fab.generate([prompt], max_new_tokens=SPLIT_NEW_TOKENS,
                                           ignore_eos=True)[0].metrics["tpot_s"]
                              for _ in range(SPLIT_RUNS)]
    finally:
        ray.shutdown()
    split, local = (statistics.median(runs[k]) for k in ("split", "local"))
    return {"split_step_ratio": split / local, "tpot_split_s": split, "tpot_local_s": local,
            "tpot_split_runs_s": runs["split"], "tpot_local_runs_s": runs["local"],
            "context_tokens": len(prompt), "instances": 3, "kv_blocks": kv_blocks,
            "block_size": block, "new_tokens": SPLIT_NEW_TOKENS}


def vllm_runs(quick: bool) -> tuple[list[dict], str | None]:
    """vLLM on every workload in one process, prefix caching off: its rows, or an error."""
    if not os.path.isfile(PEER_PYTHON):
        return [], f"{PEER_PYTHON} not found (make bench-peers)"
    try:
        model = hf_model_dir()
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "vllm.json")
            cmd = [PEER_PYTHON, "-m", "bench.peers.vllm_runner", "--workload", ",".join(NAMES),
                   "--prefix-caching", "off", "--block-size", str(VLLM_BLOCK_SIZE),
                   "--model", model, "--out", out] + (["--quick"] if quick else [])
            done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                  timeout=PEER_TIMEOUT_S)
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                return [], f"vllm_runner exited {done.returncode}: {' '.join(tail)}"
            with open(out) as f:
                return json.load(f), None
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return [], f"{type(e).__name__}: {e}"


def row(rows: list[dict], engine: str, workload: str, instances: int | None = None):
    return next((r for r in rows if r["engine"] == engine and r["workload"] == workload
                 and r.get("instances") == instances), None)


def decode_tok_s(r: dict | None) -> float | None:
    return 1 / r["tpot_p50_s"] if r and r["tpot_p50_s"] else None


def best_over_vllm(rows: list[dict], workload: str, figure) -> tuple[float | None, int | None]:
    """(the best fabric arm's `figure` over vLLM's on `workload`, that arm's instances)."""
    ours = {n: figure(row(rows, "kv-fabric", workload, n)) for n in ARMS}
    best = max(ours, key=lambda n: ours[n] or 0.0)
    theirs = figure(row(rows, "vllm-cpu", workload))
    return (ours[best] / theirs if ours[best] and theirs else None), best


def differing(a: dict | None, b: dict | None) -> int | None:
    """How many requests' outputs differ between two rows of the same workload."""
    if a is None or b is None:
        return None
    return sum(x != y for x, y in zip(a["outputs"], b["outputs"]))


def outputs_match(rows: list[dict]) -> dict:
    per = {w: {"requests": row(rows, "kv-fabric", w, 1)["num_requests"],
               "differing_between_arms": differing(row(rows, "kv-fabric", w, 1),
                                                   row(rows, "kv-fabric", w, 2)),
               "differing_from_vllm": differing(row(rows, "kv-fabric", w, 1),
                                                row(rows, "vllm-cpu", w))} for w in NAMES}
    vllm = [p["differing_from_vllm"] for p in per.values()]
    return {"equal": None if None in vllm else not any(vllm),
            "requests_differing_from_vllm": None if None in vllm else sum(vllm),
            "requests_differing_between_arms": sum(p["differing_between_arms"]
                                                   for p in per.values()),
            "per_workload": per}


def fmt(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def print_rows(rows: list[dict]) -> None:
    print_table(["engine", "inst", "workload", "seconds", "tok/s", "TTFT p50", "TTFT p90",
                 "TPOT p50", "TPOT p90", "load 1m"],
                [(r["engine"], r.get("instances") or "-", r["workload"], fmt(r["seconds"], ".2f"),
                  fmt(r["tokens_per_s"], ".1f"), fmt(r["ttft_p50_s"]), fmt(r["ttft_p90_s"]),
                  fmt(r["tpot_p50_s"]), fmt(r["tpot_p90_s"]),
                  fmt(r.get("load_average", [None])[0], ".1f")) for r in rows])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (workloads.QUICK)")
    ap.add_argument("--no-peers", action="store_true", help="skip vLLM")
    args = ap.parse_args(argv)
    fns = [workloads.SERVING[n] for n in NAMES]
    loads = [workloads.quick(fn, vocab_size=VOCAB_SIZE) if args.quick
             else fn(vocab_size=VOCAB_SIZE) for fn in fns]
    load_before = load_average()
    rows = fabric_runs(loads)
    split = split_step()
    vllm, vllm_error = vllm_runs(args.quick) if not args.no_peers else ([], "--no-peers")
    load_after = load_average()
    rows += vllm
    throughput, best_arm = best_over_vllm(rows, "fixed", lambda r: r and r["tokens_per_s"])
    one, one_arm = best_over_vllm(rows, "one_request", decode_tok_s)
    for r in rows:
        if r["workload"] == "one_request":
            r["decode_tok_s"] = decode_tok_s(r)
    result = {
        "throughput_vs_vllm": throughput, "throughput_best_arm_instances": best_arm,
        "one_request_vs_vllm": one, "one_request_best_arm_instances": one_arm,
        "split_step_ratio": split["split_step_ratio"], "goals": GOALS,
        "outputs_match": outputs_match(rows),
        "vllm_error": vllm_error,
        "vllm_arrivals": next((r["arrivals"] for r in vllm if r["workload"] == "burstgpt"), None),
        "load_average_before": load_before, "load_average_after": load_after,
        "runs": [{k: v for k, v in r.items() if k not in DROP} for r in rows],
        "split_step": split,
        "quick": args.quick,
        "config": {"model": MODEL, "arms_instances": list(ARMS), "block_size": BLOCK_SIZE,
                   "vllm_block_size": VLLM_BLOCK_SIZE, "kv_blocks": KV_BLOCKS,
                   "max_batch_tokens": MAX_BATCH_TOKENS, "prefix_caching": False,
                   "workloads": {w["name"]: {"requests": len(w["prompts"]),
                                             "prompt_tokens": sum(map(len, w["prompts"])),
                                             "max_new_tokens": sum(w["max_new_tokens"]),
                                             "last_arrival_s": max(w["arrival_s"])}
                                 for w in loads}},
    }
    print_rows(rows)
    print()
    print_table(["metric", "value", "goal"],
                [(k, fmt(result[k]), g) for k, g in GOALS.items()])
    print(f"outputs differing from vLLM: {result['outputs_match']['requests_differing_from_vllm']}"
          f", between arms: {result['outputs_match']['requests_differing_between_arms']}; "
          f"load average {load_before} -> {load_after}")
    if vllm_error:
        print(f"vLLM not run: {vllm_error}")
    write_json("serving", result)
    return result


if __name__ == "__main__":
    main()
